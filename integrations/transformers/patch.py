"""``tileflow.patch(model)``: eager decode of a live transformers model through the suite.

A one-token step on a transformers ``StaticCache`` runs as one program of suite
kernels, replayed from a CUDA graph on a GPU (``decode_step.py``); other decode steps
(a dynamic cache, say) run layer by layer as below. A prompt into an empty cache runs
the model's arithmetic as a lean PyTorch program (``prefill.py``), graphed on a GPU.
A DeepSeek-V2 / V3 model takes only the one-token steps of one sequence, as its own
program (MLA over the latent cache, routed experts: ``deepseek_step.py``); every other
call runs the model's forward.

Each decoder layer of a Qwen2 or Llama model gets a forward that, for a decode step
(one new token, batch 1, a cache that returns the full K/V history), runs::

    rms_norm -> matvec, matvec_pair -> rope (q, k) -> cache.update
      -> gqa_attention (filled part only) -> matvec_residual
      -> rms_norm -> gate_up_silu -> matvec_residual

and the original forward otherwise (prefill, batches, training, an unknown cache).
The final norm and the lm_head take the suite's kernels for decode rows. Anything
that would not compute exactly what the model computes is left unpatched, with the
reason in the report; an unsupported model comes back unchanged.

``generate``'s plain greedy calls on such a model run a lean loop (``_lean_sample``):
the same tokens as transformers' ``_sample``, without its host read of the stop flag
every token (options ``generate_loop``); any other call runs transformers' own loop.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from tileflow.integrations.shared.hf import cache_argument, cache_field
from tileflow.integrations.transformers.decode_step import DecodeProgram, GraphedDecode, decode_request, verify_request
from tileflow.integrations.transformers.compat import (assisted_takes_static, assisted_takes_static_subclass,
                                                       draft_static_cache, rope_config_of)
from tileflow.integrations.transformers.deepseek_step import DEEPSEEK_MODEL_TYPES, DeepSeekDecodeProgram, deepseek_problems
from tileflow.integrations.transformers.guards import CacheFill, CacheFullError, WeightWatch, cache_full_message
from tileflow.integrations.transformers.prefill import GraphedPrefill, PrefillProgram, prefill_request
from tileflow.integrations.transformers import quantized
from tileflow import settings
from tileflow.report import Report
from tileflow.runtime import ops

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# cache layers whose update() returns [B, NKV, S, DH] holding positions 0..pos in order
FULL_HISTORY_CACHE_LAYERS = ("StaticLayer", "DynamicLayer")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class PatchReport(Report):
    """What ``patch`` replaced (pattern name -> count) and what it left, and why."""

    model_type: str = ""
    patched: bool = False
    notes: list = field(default_factory=list)  # what patch changed besides forwards (generate's defaults)
    steps: int = 0  # decode steps the whole-step program ran (the fast path, counted)
    verify_steps: int = 0  # of those, speculative verify steps (several tokens of one sequence)
    generate_loops: int = 0  # generate calls that ran the lean greedy loop (``_lean_sample``)
    replaced_by: Optional["PatchReport"] = None  # the report of a re-patch after weights were replaced
    quantized: dict = field(default_factory=dict)  # projection -> max relative error measured at patch (weights=)

    def __post_init__(self):
        self.title = f"tileflow.patch: {self.model_type}"

    def __str__(self) -> str:
        text = super().__str__().replace(self.title, self.title + (": patched" if self.patched else
                                                                   ": left unchanged"), 1)
        return "\n".join([text] + [f"  note: {n}" for n in self.notes])


def _check_model(model, options: settings.Options) -> list[str]:
    cfg = model.config
    why = []
    if cfg.model_type not in SUPPORTED_MODEL_TYPES + DEEPSEEK_MODEL_TYPES:
        return [f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES + DEEPSEEK_MODEL_TYPES}"]
    if getattr(cfg, "hidden_act", "silu") != "silu":
        why.append(f"hidden_act {cfg.hidden_act!r} (the MLP kernel computes SiLU)")
    if getattr(cfg, "mlp_bias", False):
        why.append("mlp_bias=True (the MLP kernels have no bias)")
    if getattr(cfg, "use_sliding_window", False):
        why.append("sliding-window attention")
    if getattr(cfg, "attention_dropout", 0.0) and model.training:
        why.append("attention dropout in training mode")
    # DeepSeek's rope reads the model's own frequency table (deepseek_step), any rope_type that keeps one
    _, rope_why = rope_config_of(cfg) if cfg.model_type not in DEEPSEEK_MODEL_TYPES else (None, "")
    if rope_why:
        why.append(rope_why)
    dtype = next(model.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {dtype} (bf16, fp16, fp32 are supported)")
    device = next(model.parameters()).device
    if device.type not in ("cuda", "cpu"):
        why.append(f"device {device.type!r}")
    if device.type == "cpu" and not options.cpu:
        why.append("on CPU the suite runs its verified reference, slower than the model's own code: left "
                   "unchanged (options={'cpu': True} runs it, to verify)")
    return why


def _layer_problems(layer) -> list[str]:
    attn, mlp = layer.self_attn, layer.mlp
    why = []
    if attn.o_proj.bias is not None:
        why.append("o_proj has a bias")
    if (attn.k_proj.bias is None) != (attn.q_proj.bias is None) or (attn.k_proj.bias is None) != (
            attn.v_proj.bias is None):
        why.append("q/k/v biases differ in presence")
    if getattr(attn, "sliding_window", None):
        why.append("sliding window")
    if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        why.append("MLP projections have biases")
    return why


class _StepCheck:
    """Decides once per decode step, at the first patched layer, whether the step
    may take the decode kernels: the new token's position must be the cache's
    filled length (else the sequence is padded and the mask, not the length, says
    what to attend to). Costs one host sync a token; generate syncs each step anyway."""

    def __init__(self):
        self.reason = ""

    def evaluate(self, position_ids, cache, layer_idx) -> str:
        slot = cache.get_seq_length(layer_idx)
        capacity = cache.layers[layer_idx].get_max_length()
        if capacity is not None and capacity >= 0 and int(slot) >= capacity:
            raise CacheFullError(cache_full_message(int(slot), capacity))
        pos = int(position_ids.reshape(-1)[0])
        self.reason = "" if pos == int(slot) else (
            "padded sequence: the position differs from the cache length, so the mask decides")
        return self.reason


class _DecodeLayer:
    """The decode forward of one decoder layer (set as ``layer.forward``)."""

    def __init__(self, layer, rope_cfg: ops.RopeConfig, report: PatchReport, where: str,
                 step: _StepCheck, first: bool):
        self.layer, self.rope_cfg, self.report, self.where = layer, rope_cfg, report, where
        self.step, self.first = step, first
        self.broken = False
        self.original = layer.forward
        attn = layer.self_attn
        self.nh = layer.self_attn.config.num_attention_heads
        self.nkv = layer.self_attn.config.num_key_value_heads
        self.dh = attn.head_dim
        self._seen: set = set()

    def _fallback(self, reason: str):
        if reason not in self._seen:  # keep the first occurrence of each reason
            self._seen.add(reason)
            self.report.fallbacks.append(("decoder_layer", self.where, f"ran the original forward: {reason}"))

    def __call__(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, position_embeddings=None, **kwargs):
        cache = cache_argument(kwargs, past_key_values)

        def original():
            # past_key_values only where the caller gave it: transformers 5.24+ warns when
            # it comes beside cache= (even as None)
            given = {} if past_key_values is None else {"past_key_values": past_key_values}
            return self.original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache, position_embeddings=position_embeddings, **given, **kwargs)

        reason = self._why_not(hidden_states, position_ids, cache)
        if reason:
            if reason != "prefill":
                self._fallback(reason)
            return original()
        if self.broken:
            return original()
        try:
            projected = self.project(hidden_states, position_ids)
        except Exception as exc:  # nothing written yet: the original forward is exact
            self.broken = True
            self._fallback(f"disabled after an error: {type(exc).__name__}: {exc}"[:300])
            return original()
        return self.attend_and_mlp(hidden_states, projected, cache)

    def _why_not(self, h, position_ids, cache) -> str:
        if h.dim() != 3 or h.shape[1] != 1:
            return "prefill"
        if h.shape[0] != 1:
            return f"batch {h.shape[0]} (decode kernels assume one unpadded sequence)"
        if self.layer.training:
            return "training mode"
        if position_ids is None or cache is None:
            return "no position_ids / cache"
        layers = getattr(cache, "layers", None)
        idx = self.layer.self_attn.layer_idx
        if layers is None or idx >= len(layers) or type(layers[idx]).__name__ not in FULL_HISTORY_CACHE_LAYERS:
            kind = type(layers[idx]).__name__ if layers is not None and idx < len(layers) else type(cache).__name__
            return f"cache layer {kind} (supported: {', '.join(FULL_HISTORY_CACHE_LAYERS)})"
        if self.first:
            return self.step.evaluate(position_ids, cache, idx)
        return self.step.reason

    def project(self, hidden, position_ids):
        """Norm, q/k/v projections and RoPE: everything before the cache is written."""
        layer = self.layer
        attn = layer.self_attn
        b, _, d = hidden.shape
        x = hidden.reshape(b, d)
        xn = ops.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = ops.matvec(xn, attn.q_proj.weight, attn.q_proj.bias)
        k, v = ops.matvec_pair(xn, attn.k_proj.weight, attn.v_proj.weight, attn.k_proj.bias, attn.v_proj.bias)
        pos = position_ids.reshape(b)
        q = ops.rope_q(q.view(b, self.nh, self.dh), pos, self.rope_cfg)
        k = ops.rope_q(k.view(b, self.nkv, self.dh), pos, self.rope_cfg)
        return x, q, k, v, pos

    def attend_and_mlp(self, hidden, projected, cache):
        layer = self.layer
        attn, mlp, ln2 = layer.self_attn, layer.mlp, layer.post_attention_layernorm
        x, q, k, v, pos = projected
        b, _, d = hidden.shape
        keys, values = cache.update(k.view(b, self.nkv, 1, self.dh), v.view(b, self.nkv, 1, self.dh),
                                    attn.layer_idx)
        o = ops.gqa_attention(q, keys, values, pos + 1, attn.scaling)
        h1 = ops.matvec_residual(o.view(b, self.nh * self.dh), attn.o_proj.weight, x)
        g = ops.gate_up_silu(ops.rms_norm(h1, ln2.weight, ln2.variance_epsilon), mlp.gate_proj.weight,
                             mlp.up_proj.weight)
        return ops.matvec_residual(g, mlp.down_proj.weight, h1).view(b, 1, d)


def _guarded(fast, original, report: PatchReport, pattern: str, where: str):
    """``fast(x)`` for decode rows (one token a sequence), else or after any error of
    ``fast`` (reported once, then never tried again) ``original(x)``."""
    state = {"broken": False}

    def forward(x):
        if state["broken"] or x.dim() != 3 or x.shape[1] != 1:
            return original(x)
        try:
            return fast(x)
        except Exception as exc:  # a pure function: the original recomputes it exactly
            state["broken"] = True
            report.fallbacks.append((pattern, where, f"disabled after an error: {type(exc).__name__}: {exc}"[:300]))
            return original(x)

    return forward


def _norm_forward(norm, report: PatchReport):
    def fast(h):
        b, _, d = h.shape
        return ops.rms_norm(h.reshape(b, d), norm.weight, norm.variance_epsilon).view(b, 1, d)

    return _guarded(fast, norm.forward, report, "rms_norm", "model.norm")


def _lm_head_forward(lm_head, report: PatchReport):
    def fast(x):
        b, _, d = x.shape
        return ops.matvec(x.reshape(b, d), lm_head.weight, lm_head.bias).view(b, 1, -1)

    return _guarded(fast, lm_head.forward, report, "matvec", "lm_head")


# why a several-token call may be no prompt into an empty cache (it continues a sequence
# where the cache holds tokens); the last one says so itself
CONTINUATIONS = ("position_ids not 0..T-1", "cache_position not 0..T-1", "the cache already holds tokens (chunked prompt)")


def _holds_tokens(cache) -> bool:
    """Whether ``cache`` (any kind) holds tokens: one device read where it counts there."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(layers[0], "is_initialized", True):
        return False
    return int(cache.get_seq_length()) > 0


def _whole_step_forward(model, runner: GraphedDecode, report: PatchReport,
                        prefill: Optional[GraphedPrefill] = None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    seen: set = set()
    state = {"broken": False}
    fill = CacheFill()

    def fallback(why, *args, **kwargs):
        fill.forget()  # the original forward may write the cache
        return original(*args, **kwargs)

    def step(tok, pos, cache, mask, keep=0):
        """The program's logits [B, R, V] (the last ``keep`` of R where given), or None after it failed."""
        b, r = tok.shape
        fill.check(cache, cache.layers[0].keys.shape[2], r)  # raises before anything is written
        try:
            logits = runner(tok, pos, cache, mask)
        except Exception as exc:  # e.g. a kernel that does not compile on this device:
            # the cache rows are rewritten by the original forward and the count is only
            # advanced at the end of the program, so running the original is exact
            state["broken"] = True
            report.fallbacks.append(("decode_step", type(model).__name__,
                                     f"disabled after an error: {type(exc).__name__}: {exc}"[:300]))
            return None
        fill.advanced(r)
        report.steps += 1
        report.verify_steps += r > 1
        logits = logits.view(b, r, -1)
        return logits[:, -keep:] if 0 < keep < r else logits

    def verified(verify, args, kwargs):
        """The verify step's output through the program, or the original forward's after it failed."""
        logits = step(*verify)
        if logits is None:
            return fallback("broken", *args, **kwargs)
        return CausalLMOutputWithPast(logits=logits, **{cache_field(): verify[2]})

    @functools.wraps(original)  # generate inspects forward's signature to choose its kwargs
    def forward(*args, **kwargs):
        tok, pos, cache, mask, why = decode_request(args, kwargs, runner.program.takes_any_position)
        why = _declined(runner.program, args, kwargs) or why
        verify, verify_why = None, ""
        if why == "not a one-token step":
            *verify, verify_why = verify_request(args, kwargs)
            if not verify_why and (model.training or torch.is_grad_enabled()):
                verify_why = "training or gradients enabled (the program keeps no autograd graph)"
            verify_why = verify_why or ("disabled after an error" if state["broken"] else "")
        if verify and not verify_why and fill.holds_tokens(verify[2]):
            return verified(verify, args, kwargs)  # a speculative verify step on a cache known to hold tokens
        if why == "not a one-token step" and prefill is not None:
            ids, cache, keep, why_not = prefill_request(args, kwargs)
            # a padded prompt also has positions other than 0..T-1: a continuation holds tokens
            continues = why_not in CONTINUATIONS and _holds_tokens(cache_argument(kwargs))
            if continues and not verify_why:
                return verified(verify, args, kwargs)  # the count was unknown here: one read said it holds tokens
            if continues:  # tokens continuing a sequence the verify program does not take
                if verify_why not in seen:
                    seen.add(verify_why)
                    report.fallbacks.append(("verify_step", type(model).__name__,
                                             f"ran the model's forward: {verify_why}"))
                return fallback(verify_why, *args, **kwargs)
            if not why_not and (model.training or torch.is_grad_enabled()):
                why_not = "training or gradients enabled (the program keeps no autograd graph)"
            if not why_not:
                logits = prefill(ids, cache, keep)
                fill.set(cache, ids.shape[1])  # prefill_request checked the cache was empty
                return CausalLMOutputWithPast(logits=logits, **{cache_field(): cache})
            if why_not not in seen and why_not != "not a batch-1 prompt":
                seen.add(why_not)
                report.fallbacks.append(("prefill", type(model).__name__, f"ran the model's forward: {why_not}"))
        if why:
            if why not in seen and why != "not a one-token step" and not why.startswith("cache not"):
                seen.add(why)
                report.fallbacks.append(("decode_step", type(model).__name__,
                                         f"ran {getattr(runner.program, 'fallback_runs', 'layer by layer')}: {why}"))
            return fallback(why, *args, **kwargs)
        if state["broken"]:
            return fallback("broken", *args, **kwargs)
        logits = step(tok, pos, cache, mask)
        if logits is None:
            return fallback("broken", *args, **kwargs)
        return CausalLMOutputWithPast(logits=logits, **{cache_field(): cache})

    return forward


def _declined(program, args, kwargs) -> str:
    """Why ``program`` does not take this forward call, or "": only a program with
    ``declines`` narrows the calls (the DeepSeek program: one token of one sequence)."""
    declines = getattr(program, "declines", None)
    return declines(kwargs.get("input_ids", args[0] if args else None), cache_argument(kwargs)) if declines else ""


def _rebuilding(model, forward, options):
    """``forward``, or after the model's weights were replaced (``WeightWatch``) a fresh
    patch of the model (whose programs read the new tensors) and its forward."""
    watch = model._tileflow_watch

    @functools.wraps(forward)
    def checked(*args, **kwargs):
        if watch.changed:
            old = model._tileflow_patch
            unpatch(model)
            new = patch(model, options)
            old.fallbacks.append(("model", type(model).__name__,
                                  "weights replaced after patch: patched again (see the new report)"))
            old.replaced_by = new
            return model.forward(*args, **kwargs)
        return forward(*args, **kwargs)

    return checked


def _no_masks_for_generate(model):
    """generate builds a 4-D mask per step for a static cache (its compiled forward wants
    one); the patched step takes the 2-D mask as its key mask, and the model's own
    forward builds the 4-D one from it when it runs instead."""
    fallback = getattr(type(model), "create_masks_for_generate", None)

    def create_masks_for_generate(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if (mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2) or fallback is None:
            return mask
        return fallback(model, *args, **kwargs)

    return create_masks_for_generate


def _static_by_default(model, prepare, made: dict, report: Optional[PatchReport] = None):
    """generate's cache preparation, asking for a static cache where the call names no
    cache and no ``cache_implementation`` (on generate's own copy of the config).
    ``made["cache"]``: a weak reference to the cache this call's preparation created (None
    where the caller passed one): the lean loop runs only on a cache generate made itself.

    Assisted generation and prompt lookup verify their drafts past ``max_length`` (the last
    round may write a row beyond it): their static cache gets the drafts' room. Where this
    transformers' assisted decoding refuses static caches by ``cache_implementation`` and the
    exact type ``StaticCache`` only (5.17, whose ``StaticLayer`` cannot crop either), the call gets
    instead a static cache of tileflow's that it takes and crops (``compat.draft_static_cache``),
    handed to the preparation as the call's cache, with ``cache_implementation`` left unset;
    so does an assistant model's own call there (the candidate generator crops the
    assistant's cache between rounds). Where this transformers names no cache length to give
    the drafts' room, or refuses a static cache otherwise, drafting calls keep the default
    cache (the model's own decode), the reason noted once in ``report``."""
    import inspect

    signature = inspect.signature(prepare)

    def note(text: str) -> None:
        if report is not None and text not in report.notes:
            report.notes.append(text)

    def _prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        made["cache"] = None
        given = any(model_kwargs.get(k) is not None for k in ("cache", "past_key_values"))
        bound = signature.bind(model, generation_config, model_kwargs, *args, **kwargs)
        drafts = _draft_rows(generation_config, bound.arguments.get("generation_mode"))
        room = drafts + 1 if drafts else 0
        length = bound.arguments.get("max_cache_length")
        wanted = (not given and generation_config.cache_implementation is None and model_kwargs.get("use_cache", True)
                  and getattr(generation_config, "use_cache", True))
        # drafting calls, and an assistant's (its cache is cropped between rounds), on a
        # transformers that refuses StaticCache for them by its exact type only (5.17)
        shim = (bool(drafts) or bool(getattr(generation_config, "is_assistant", False))) and isinstance(length, int) \
            and assisted_takes_static_subclass()  # False where static caches are taken as they are (5.25)
        own = None
        if wanted and shim:
            own, why = draft_static_cache(model.config, length + room)
            if own is None:
                note(f"generate: drafting calls keep the default cache (the model's own decode): {why}")
            else:
                model_kwargs[_cache_parameter()] = own  # generate's preparation checks it as a given cache
                note("generate: drafting calls (prompt lookup, assisted generation) and an assistant's own calls "
                     "run on a StaticCache subclass this transformers' assisted decoding takes and crops")
        elif wanted and (drafts == 0 or (isinstance(length, int) and assisted_takes_static())):
            generation_config.cache_implementation = "static"
            if drafts:
                bound.arguments["max_cache_length"] += room
        elif wanted and drafts:
            note("generate: drafting calls keep the default cache (the model's own decode): " + (
                "this transformers' cache preparation takes no cache length to give the drafts' room"
                if not isinstance(length, int) else
                "this transformers' assisted decoding refuses static caches, not only StaticCache by its exact type"))
        result = prepare(*bound.args, **bound.kwargs)
        if own is not None:  # generate's own cache, not the caller's (the preparation marked it as given)
            own.__dict__.pop("_is_user_defined", None)
            if getattr(generation_config, "is_assistant", False) and hasattr(own, "activate_past_recording"):
                own.activate_past_recording()  # as the preparation does to an assistant's cache it makes
        cache = next((model_kwargs[k] for k in ("cache", "past_key_values") if model_kwargs.get(k) is not None), None)
        if not given and cache is not None:
            made["cache"] = weakref.ref(cache)
        return result

    return _prepare_cache_for_generation


def _draft_rows(generation_config, mode) -> int:
    """The most draft tokens a verify step of this call feeds, 0 where it drafts none."""
    lookup = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if lookup:
        return int(lookup)
    if str(getattr(mode, "value", mode)) == "assisted_generation":
        return int(getattr(generation_config, "num_assistant_tokens", None) or 20)
    return 0


# how often the lean loop reads the device back to see whether an end-of-sequence token came
CHECK_EVERY = 16
_LEAN_CLASSES: dict = {}  # model class -> its subclass whose _sample defers to the instance's


def _class_with_instance_sample(cls):
    """A subclass of ``cls`` (same name, module and qualname) whose ``_sample`` calls the
    instance's own ``_sample`` where it has one, else ``cls``'s. generate picks its loop off
    the class (``getattr(type(self), "_sample")``, transformers 5.17 and 5.25), so an
    instance attribute alone would never be called: ``patch`` sets the model's class to this
    one and ``unpatch`` sets it back."""
    sub = _LEAN_CLASSES.get(cls)
    if sub is None:
        def _sample(self, *args, **kwargs):
            own = self.__dict__.get("_sample")
            if own is not None:
                return own(*args, **kwargs)
            return super(sub, self)._sample(*args, **kwargs)

        sub = type(cls.__name__, (cls,), {"_sample": _sample, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _LEAN_CLASSES[cls] = sub
    return sub


def _cache_parameter() -> str:
    """The keyword generate keeps the cache under in its model kwargs: the name
    ``prepare_inputs_for_generation`` takes it by (``cache`` from 5.24, ``past_key_values`` before)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _lean_plan(model, installed: dict, made: dict, input_ids, logits_processor, stopping_criteria,
               generation_config, synced_gpus, streamer, model_kwargs) -> tuple[Optional[dict], str]:
    """(what the lean loop needs, "") where it returns exactly what transformers' ``_sample``
    returns, else (None, why not). See :func:`_lean_sample` for the conditions."""
    from transformers.cache_utils import StaticCache
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
    from transformers.generation.utils import GenerationMixin

    gc = generation_config
    if gc.do_sample:
        return None, "sampling (do_sample=True)"
    if len(logits_processor):
        return None, f"logits processors {[type(p).__name__ for p in logits_processor]}"
    if streamer is not None:
        return None, "a streamer"
    if synced_gpus:
        return None, "synced_gpus"
    if gc.return_dict_in_generate or gc.output_scores or gc.output_logits or gc.output_attentions \
            or gc.output_hidden_states:
        return None, "return_dict_in_generate / output_scores, logits, attentions or hidden states"
    if getattr(gc, "is_assistant", False):
        return None, "an assistant model's call"
    kinds = [type(c) for c in stopping_criteria]
    if any(k not in (MaxLengthCriteria, EosTokenCriteria) for k in kinds) or kinds.count(MaxLengthCriteria) != 1:
        return None, f"stopping criteria {[k.__name__ for k in kinds]} (the loop keeps one max length and EOS tokens)"
    if input_ids.dim() != 2:
        return None, f"input_ids of {input_ids.dim()} dimensions"
    rows = input_ids.shape[0]
    if input_ids.device != model.device:
        return None, "input_ids on another device than the model"
    key = _cache_parameter()
    known = {key, "attention_mask", "position_ids", "use_cache", "logits_to_keep"}
    if set(model_kwargs) - known:
        return None, f"model kwargs {sorted(set(model_kwargs) - known)}"
    if not model_kwargs.get("use_cache"):
        return None, "use_cache=False"
    cache = model_kwargs.get(key)
    ref = made.get("cache")
    if not isinstance(cache, StaticCache) or getattr(cache, "_is_user_defined", False) or ref is None \
            or ref() is not cache:
        return None, "not a static cache generate made for the call (steps past an end-of-sequence token " \
                     "would write rows into a cache the caller keeps)"
    if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):
        return None, "cache layers other than StaticLayer"
    mask, pos = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != rows):
        return None, "an attention mask that is not one 2-D row a sequence"
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] != rows):
        return None, "position_ids that are not one 2-D row a sequence"
    # the per-step inputs below are what these produce; the instance ones are patch's own
    cls = type(model)
    for name in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        if getattr(cls, name) is not getattr(GenerationMixin, name) or name in model.__dict__:
            return None, f"the model's own {name}"
    for name, fn in installed.items():
        if model.__dict__.get(name) is not fn:
            return None, f"{name} replaced since patch"
    if getattr(model.config, "is_encoder_decoder", False) or getattr(model, "is_remote_code", lambda: True)():
        return None, "an encoder-decoder or remote-code model"
    eos = [c for c in stopping_criteria if type(c) is EosTokenCriteria]
    if eos and gc._pad_token_tensor is None:
        return None, "end-of-sequence tokens without a pad token"
    max_length = next(c.max_length for c in stopping_criteria if type(c) is MaxLengthCriteria)
    return {"key": key, "max_length": max_length,
            "eos": {int(t) for c in eos for t in c.eos_token_id.reshape(-1).tolist()}}, ""


def _lean_sample(model, base: type, report: PatchReport, installed: dict, made: dict):
    """The instance's ``_sample``: transformers' greedy loop without its host read per token,
    where the call is one it reproduces exactly, else ``base._sample`` (the model's class's
    own, looked up at the call) with the arguments unchanged, the reason noted once in the
    report.

    The lean loop runs only when all of these hold (else transformers' loop runs):

    - greedy: ``generation_config.do_sample`` false;
    - no logits processors (a plain greedy call builds none on transformers 5.17 and 5.25;
      ``repetition_penalty``, ``min_new_tokens``, ``bad_words_ids`` ... each add one);
    - stopping criteria: exactly one ``MaxLengthCriteria`` and any ``EosTokenCriteria``
      (``stop_strings``, ``max_time``, custom criteria fall back), and a pad token where
      there are EOS tokens (transformers' own loop needs one);
    - no streamer, ``synced_gpus`` false, not an assistant model's call;
    - ``return_dict_in_generate`` false and no scores, logits, attentions or hidden states;
    - ``input_ids`` [B, T] on the model's device;
    - model kwargs only the cache, ``attention_mask`` and ``position_ids`` (one 2-D row a
      sequence), ``use_cache`` (true) and ``logits_to_keep``;
    - the cache is a ``StaticCache`` of ``StaticLayer``s that this very generate call made
      (recorded by ``_prepare_cache_for_generation``), never one the caller passed: the
      loop may run a few steps past the token it stops at, writing rows of that cache;
    - ``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation`` are
      ``GenerationMixin``'s (the per-step inputs are computed as they compute them), and
      what ``patch`` set on the instance for generate (``create_masks_for_generate``
      returning the 2-D mask, no auto-compile) is still in place; not encoder-decoder or
      remote code.

    The loop: the prompt pass through ``self._prefill`` and ``_update_model_kwargs_for_generation``
    as ``_sample`` runs them; then each step calls the model (``self(...)``, the patched
    forward) with what ``prepare_inputs_for_generation`` would pass: the last token [1, 1],
    the cache, ``position_ids`` (the last one + 1 a step) and the 2-D attention mask (one 1
    appended a step) where generate has them, ``use_cache``, ``logits_to_keep``,
    ``return_dict=True``; the token is ``argmax(-1)`` of the last logits (the argmax of
    transformers' float32 copy: the conversion is exact), written on the device into a
    preallocated row. Every ``CHECK_EVERY`` steps and at the end (only where there are
    EOS tokens) the host reads the new tokens back and stops after the first EOS token,
    which is where transformers' loop stops for one sequence; so no pad token ever
    reaches the result (transformers pads only sequences already finished, and stops
    when the only one finishes), and the steps run past it feed argmax tokens, always
    inside the vocabulary. With several sequences, as transformers does, a token made
    after a sequence's EOS token becomes the pad token, on the device (``_BatchStops``),
    and the result ends after the step where every sequence had ended. The result: ``input_ids`` with the new tokens (same dtype,
    device and length as transformers' ``torch.cat``)."""
    seen: set = set()

    def _sample(input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        plan, why = _lean_plan(model, installed, made, input_ids, logits_processor, stopping_criteria,
                               generation_config, synced_gpus, streamer, model_kwargs)
        made["cache"] = None  # consumed: one generate call
        if why:
            if why not in seen:
                seen.add(why)
                report.notes.append(f"generate: transformers' own loop ran (once per reason): {why}")
            return base._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        report.generate_loops += 1
        return _greedy_loop(model, input_ids, generation_config, model_kwargs, plan)

    return _sample


def _greedy_loop(model, input_ids, generation_config, model_kwargs: dict, plan: dict) -> torch.Tensor:
    """The lean loop of :func:`_lean_sample` (its conditions checked)."""
    key, eos = plan["key"], plan["eos"]
    n = max(1, plan["max_length"] - input_ids.shape[1])  # new tokens at most: transformers' loop makes one at least
    device = input_ids.device
    b = input_ids.shape[0]
    tokens = torch.empty((b, n), dtype=torch.long, device=device)
    rows = _BatchStops(tokens, eos, generation_config._pad_token_tensor) if b > 1 and eos else None
    outputs = model._prefill(input_ids, generation_config, model_kwargs,
                             is_first_iteration=not generation_config.is_assistant)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    torch.argmax(outputs.logits[:, -1], dim=-1, out=tokens[:, 0])
    if rows is not None:
        rows.made(0)
    del outputs
    # the inputs prepare_inputs_for_generation / _update_model_kwargs_for_generation give
    # step i (1..n-1): the token made by step i - 1, the position after the last one, the
    # mask with one more 1
    step_kwargs = {key: model_kwargs[key]}
    for name in ("use_cache", "logits_to_keep"):
        if name in model_kwargs:
            step_kwargs[name] = model_kwargs[name]
    pos, mask = model_kwargs.get("position_ids"), model_kwargs.get("attention_mask")
    if pos is not None:  # [B, n - 1]: step i takes column i - 1
        pos = pos[:, -1:] + torch.arange(n - 1, dtype=pos.dtype, device=pos.device).view(1, -1)
    if mask is not None:  # step i takes the first filled + i - 1 columns
        filled = mask.shape[1]
        mask = torch.cat([mask, mask.new_ones((b, n - 1))], dim=-1)
    checked, count = 0, n  # tokens read back so far; tokens the result keeps
    optimize = getattr(model, "_optimize_model_for_decode", None)
    with optimize() if optimize is not None else contextlib.nullcontext():
        for i in range(1, n + 1):
            if eos and (i - checked >= CHECK_EVERY or i == n):
                if rows is not None:
                    hit = rows.first_all_done(checked, i)  # the one host read of these steps
                else:
                    new = tokens[0, checked:i].tolist()  # the one host read of these steps
                    hit = next((j for j, t in enumerate(new) if t in eos), None)
                if hit is not None:
                    count = checked + hit + 1
                    break
                checked = i
            if i == n:
                break
            inputs = {"input_ids": tokens[:, i - 1:i], **step_kwargs}
            if pos is not None:
                inputs["position_ids"] = pos[:, i - 1:i]
            if mask is not None:
                inputs["attention_mask"] = mask[:, :filled + i - 1]
            outputs = model(**inputs, return_dict=True)
            torch.argmax(outputs.logits[:, -1], dim=-1, out=tokens[:, i])
            if rows is not None:
                rows.made(i)
            del outputs
    return torch.cat([input_ids, tokens[:, :count]], dim=-1)


class _BatchStops:
    """transformers' per-sequence stop for a batch, on the device: a token made after its
    sequence's end-of-sequence token becomes the pad token, and the loop ends after the
    step where every sequence has ended (read back every ``CHECK_EVERY`` steps)."""

    def __init__(self, tokens: torch.Tensor, eos: set, pad: torch.Tensor):
        self.tokens = tokens
        self.eos = torch.tensor(sorted(eos), dtype=tokens.dtype, device=tokens.device)
        self.pad = pad.to(tokens.device, tokens.dtype)
        self.unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        self.done = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)

    def made(self, i: int) -> None:
        t = self.tokens[:, i]
        t.copy_(torch.where(self.unfinished, t, self.pad))
        self.unfinished &= ~torch.isin(t, self.eos)
        self.done[i] = ~self.unfinished.any()

    def first_all_done(self, start: int, end: int):
        """The first step in [start, end) after which every sequence had ended, or None."""
        hits = self.done[start:end].nonzero()
        return int(hits[0, 0]) if hits.numel() else None


def _generation_defaults(model, report: PatchReport, whole_step: bool, options: settings.Options) -> dict:
    """What ``patch`` sets on the instance for ``generate`` (the saved values, for unpatch):
    no auto-compile (the patched step is already a CUDA graph; a compiled forward
    around it would trace into the kernels), a static cache by default where the
    whole-step program serves it (it writes StaticLayer tensors), and there (unless
    ``options.generate_loop`` is off) a ``_sample`` that runs greedy calls as a
    lean loop (:func:`_lean_sample`)."""
    saved = {}

    def _no_auto_compile(*args, **kwargs):
        return False

    model._valid_auto_compile_criteria = _no_auto_compile
    saved["_valid_auto_compile_criteria"] = None
    gen = getattr(model, "generation_config", None)
    if whole_step and gen is not None:
        model.create_masks_for_generate = _no_masks_for_generate(model)
        saved["create_masks_for_generate"] = None
        prepare = getattr(type(model), "_prepare_cache_for_generation", None)
        if prepare is not None:
            made: dict = {"cache": None}
            model._prepare_cache_for_generation = _static_by_default(model, prepare, made, report)
            saved["_prepare_cache_for_generation"] = None
            report.notes.append("generate: a static cache where no cache or cache_implementation is given "
                                "(the whole-step program writes static caches)")
            if options.generate_loop and callable(getattr(type(model), "_sample", None)):
                installed = {name: model.__dict__[name] for name in
                             ("_valid_auto_compile_criteria", "create_masks_for_generate")}
                model._sample = _lean_sample(model, type(model), report, installed, made)
                saved["_sample"] = None
                saved["__class__"] = type(model)
                model.__class__ = _class_with_instance_sample(type(model))
                report.notes.append(f"generate: greedy calls on a cache generate makes run a lean loop "
                                    f"(a host read every {CHECK_EVERY} tokens, not every token; "
                                    f"options={{'generate_loop': False}}: transformers' loop)")
    report.notes.append("generate: no auto-compile (the patched step is already a CUDA graph on a GPU)")
    return saved


def patch(model, options=None) -> PatchReport:
    """Route the decode steps of a transformers Qwen2 / Llama model through the suite.

    Returns a :class:`PatchReport`. Unsupported models, dtypes, devices or layer
    shapes are left unchanged (the report says why); nothing raises mid-generation.
    ``options``: a :class:`tileflow.settings.Options` or a mapping of its fields
    (overriding the environment). ``tileflow.unpatch(model)`` undoes it.
    """
    options = settings.resolve(options)
    cfg = model.config
    report = PatchReport(model_type=getattr(cfg, "model_type", type(model).__name__))
    if getattr(model, "_tileflow_patch", None) is not None:
        return model._tileflow_patch
    problems = _check_model(model, options)
    if problems:
        report.fallbacks += [("model", type(model).__name__, p) for p in problems]
        return report
    if cfg.model_type in DEEPSEEK_MODEL_TYPES and options.weights != "model":
        report.fallbacks.append(("model", type(model).__name__, f"weights={options.weights!r}: quantized "
                                 f"projections are for Qwen2 / Llama models (the DeepSeek program has none)"))
        return report
    if cfg.model_type in DEEPSEEK_MODEL_TYPES:  # MLA and MoE: whole decode steps only
        return _patch_deepseek(model, report, options)
    rope_cfg, _ = rope_config_of(cfg)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        report.fallbacks.append(("model", type(model).__name__, "no .model.layers"))
        return report
    if options.weights != "model" or quantized.fp8_checkpoint(model):  # int4 / fp8 projections
        return _patch_quantized(model, report, options, rope_cfg)
    patched, step = [], _StepCheck()
    for i, layer in enumerate(layers):
        where = f"model.layers.{i}"
        why = _layer_problems(layer)
        if why:
            report.fallbacks.append(("decoder_layer", where, "; ".join(why)))
            continue
        layer.forward = _DecodeLayer(layer, rope_cfg, report, where, step, first=not patched)
        patched.append(layer)
        report.matches.update({"rms_norm": 2, "matvec": 1, "matvec_pair": 1, "rope": 2, "gqa_attention": 1,
                               "matvec_residual": 2, "gate_up_silu": 1})
    if getattr(base, "norm", None) is not None and hasattr(base.norm, "variance_epsilon"):
        base.norm.forward = _norm_forward(base.norm, report)
        patched.append(base.norm)
        report.matches["rms_norm"] += 1
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, torch.nn.Linear):
        lm_head.forward = _lm_head_forward(lm_head, report)
        patched.append(lm_head)
        report.matches["matvec"] += 1
    whole = len(patched) == len(layers) + 2 and lm_head.bias is None
    if next(model.parameters()).is_cuda:
        # on a GPU the layer-by-layer launches from Python are slower than the model's own
        # code (docs/performance.md): only whole steps run the suite there
        for m in patched:
            m.__dict__.pop("forward", None)
        patched = []
        if not whole:
            report.matches.clear()
            report.fallbacks.append(("decode_step", type(model).__name__,
                                     "not every layer qualifies, and on a GPU layer-by-layer decode is slower "
                                     "than the model's own code: left unchanged"))
            return report
    if whole:
        # every piece qualifies: whole decode steps on a static cache run as one program
        # prefill=False leaves prompts to the model's forward (to measure what the program buys)
        prefill = GraphedPrefill(PrefillProgram(model), options=options) if options.prefill else None
        program = DecodeProgram(model, rope_cfg, options)
        report.notes.extend(program.notes)  # early inputs the launch plan turned off, and why
        model.forward = _whole_step_forward(model, GraphedDecode(program), report, prefill)
        whole_step = True
        report.matches["embedding"] += 1
        if prefill is not None:
            report.matches["prefill"] += 1
    else:
        whole_step = False
        report.fallbacks.append(("decode_step", type(model).__name__,
                                 "not every layer qualifies: decode runs layer by layer"))
    report.patched = bool(patched) or whole_step
    if not report.patched:
        return report
    model._tileflow_watch = WeightWatch(model)
    # any torch.compile around the patched model (generate's auto-compile, the user's own)
    # runs the patched forwards as they are rather than tracing into the kernels
    # (the disabled function sits inside: torch.compile unwraps a disabled function it is given)
    forward = model.forward if whole_step else type(model).forward.__get__(model)
    model.forward = _rebuilding(model, torch.compiler.disable(forward, recursive=True), options)
    patched.append(model)
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), _DecodeLayer):
            layer.forward = torch.compiler.disable(layer.forward)
    model._tileflow_saved = _generation_defaults(model, report, whole_step, options)
    model._tileflow_patch = report
    model._tileflow_patched_modules = patched
    return report


def _patch_deepseek(model, report: PatchReport, options: settings.Options) -> PatchReport:
    """``patch`` of a DeepSeek-V2 / V3 model: one-token steps on a static cache run
    ``DeepSeekDecodeProgram`` (``deepseek_step.py``), every other call the model's own
    forward (no layer-by-layer path, no prompt program); what patch sets for generate as
    for the whole-step Qwen2 / Llama path. A model the kernels do not cover is left unchanged."""
    problems = deepseek_problems(model)
    if problems:
        report.fallbacks += [("model", type(model).__name__, p) for p in problems]
        return report
    program = DeepSeekDecodeProgram(model, options)
    report.matches.update(program.matches)
    return _install_program(model, program, report, options, [model])


def _patch_quantized(model, report: PatchReport, options: settings.Options, rope_cfg) -> PatchReport:
    """``patch`` with quantized projections (``options.weights``, or an fp8 checkpoint's
    FP8Linear modules): one-token steps on a static cache run ``QuantizedDecodeProgram``
    (``quantized.py``); every other call runs the model's forward, whose projection modules
    compute through the same quantized matvecs. Needs every layer to qualify (no
    layer-by-layer path reads quantized weights), else the model is left unchanged."""
    base = model.model
    problems = [f"model.layers.{i}: {'; '.join(why)}" for i, layer in enumerate(base.layers)
                if (why := _layer_problems(layer))]
    if not hasattr(getattr(base, "norm", None), "variance_epsilon"):
        problems.append("no RMSNorm model.norm")
    if type(getattr(model, "lm_head", None)) is not torch.nn.Linear or model.lm_head.bias is not None:
        problems.append("lm_head is not a bias-free nn.Linear")
    problems += quantized.problems(model, options.weights)
    if problems:
        report.fallbacks += [("model", type(model).__name__, f"{p} (quantized weights run whole steps only)")
                             for p in problems]
        return report
    program = quantized.QuantizedDecodeProgram(model, rope_cfg, options.weights)
    report.matches.update(program.matches)
    report.quantized = dict(program.errors)
    report.notes += program.notes()
    _install_program(model, program, report, options, [model] + program.install_forwards())
    if program.host.entries:  # the projections' weights are on the host: unpatch brings them back
        model._tileflow_restore = program.host.restore
        model._apply = program.host.guard_apply()  # over WeightWatch's; its release removes both
    return report


def _install_program(model, program, report: PatchReport, options: settings.Options, modules: list) -> PatchReport:
    """``model.forward`` runs ``program``'s one-token steps (CUDA-graphed) and every other
    call through the model's own forward (prompts included); ``modules``: what unpatch restores."""
    model._tileflow_watch = WeightWatch(model)
    forward = _whole_step_forward(model, GraphedDecode(program), report)
    model.forward = _rebuilding(model, torch.compiler.disable(forward, recursive=True), options)
    report.patched = True
    model._tileflow_saved = _generation_defaults(model, report, True, options)
    model._tileflow_patch = report
    model._tileflow_patched_modules = modules
    return report


def unpatch(model) -> bool:
    """Restore every forward ``patch`` replaced; True if the model was patched."""
    if getattr(model, "_tileflow_patch", None) is None:
        return False
    for m in model._tileflow_patched_modules:
        m.__dict__.pop("forward", None)  # the instance attribute; the class's forward shows through again
    restore = model.__dict__.pop("_tileflow_restore", None)
    if restore is not None:  # weights= moved the quantized projections' own weights to the host
        restore()
    for name, value in model._tileflow_saved.items():
        if name.startswith("generation_config."):
            setattr(model.generation_config, name.split(".", 1)[1], value)
        elif name == "__class__":
            if type(model) is _LEAN_CLASSES.get(value):
                model.__class__ = value
        else:
            model.__dict__.pop(name, None)
    model._tileflow_watch.release()
    model._tileflow_patch = None
    model._tileflow_patched_modules = []
    return True


def patch_report(model) -> Optional[PatchReport]:
    return getattr(model, "_tileflow_patch", None)
