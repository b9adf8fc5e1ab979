"""Low-precision projection weights through ``tileflow.patch`` (issue 35): int4 and fp8.

``tileflow.patch(model, options={"weights": "int4"})`` (or ``"fp8"``) quantizes the q/k/v/o
and gate/up/down projections of every decoder layer with ``tileflow.suite.quantize`` and
runs the decode step on the copies through ``matvec_int4`` / ``matvec_fp8``. A model whose
projections are transformers' ``FP8Linear`` (a fine-grained FP8 checkpoint, 128 x 128
blocks, dynamic activations) runs them through ``matvec_fp8`` on the tensors where they
lie (``weight`` and ``weight_scale_inv``), whatever the option says but ``int4``.

What stays in the model's dtype: the embeddings, the norms and the lm_head (as transformers'
FP8 quantizer and DeepSeek-V3's fp8 checkpoints keep it: the logits decide every greedy
token, and small Qwen2 models tie it to the embedding table, so a copy would add bytes
rather than replace them), and any projection the int4 layout cannot take (K not a
multiple of 256), named in the report.

Quantized in place (``weights=`` "int4" / "fp8"): layer by layer, each quantized projection's
own weight leaves the device for host memory (pinned on CUDA) as soon as its layer is quantized,
and the module's ``weight`` becomes a :class:`HostWeight` (shape and dtype, no storage, on
``meta``): the device holds the quantized copies instead of the bf16 weights (int4 about 0.27x,
fp8 about 0.5x of them). ``unpatch`` moves the originals back (the same Parameter objects,
bit-exact); ``state_dict()`` while patched gives the originals (from the host). Every path of the patched model computes with the
quantized weights: the whole decode step is :class:`QuantizedDecodeProgram`, and every
other call (a prompt, a dynamic cache, a batch the program declines) runs the model's
own forward, whose projection modules get a forward through the same quantized matvecs.

The step runs the fused quantized kernels (``tileflow.suite.matvec_quant_fused``), as the
model-dtype program runs its fused ones: per layer rms_norm_qkv_rope_cache (the norm, the
q/k/v projections + biases, RoPE, K/V written into the static cache: one launch) ->
gqa_attention -> matvec_residual (o) -> rms_norm_gate_up_silu -> matvec_residual (down), then
the final rms_norm_matvec. A group whose projections differ in kind (a projection the int4
layout cannot take stays in the model's dtype) or carry biases the fused form does not take
runs its plain sequence: rms_norm, one matvec a projection, rope_q, the cache write,
silu_mul, residual_add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tileflow.integrations.transformers.decode_step import _advance, step_rows
from tileflow.runtime import ops
from tileflow.suite import quantize as Q

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def is_fp8_linear(module) -> bool:
    """Whether ``module`` is transformers' fine-grained ``FP8Linear`` holding float8 weights."""
    return type(module).__name__ == "FP8Linear" and getattr(module, "weight", None) is not None \
        and module.weight.dtype == torch.float8_e4m3fn


def fp8_checkpoint(model) -> bool:
    """Whether any decoder projection of ``model`` is an ``FP8Linear`` (a loaded fp8 checkpoint)."""
    return any(is_fp8_linear(getattr(getattr(layer, part), name))
               for layer in model.model.layers for part, name in PROJECTIONS)


def problems(model, weights: str) -> list[str]:
    """Why the quantized path cannot take ``model`` with option ``weights``, or []."""
    why = []
    for i, layer in enumerate(model.model.layers):
        for part, name in PROJECTIONS:
            m = getattr(getattr(layer, part), name)
            if not is_fp8_linear(m):
                continue
            where = f"model.layers.{i}.{part}.{name}"
            if weights == "int4":
                return [f"{where} is FP8Linear: weights='int4' would re-quantize fp8 weights (not done)"]
            if tuple(m.block_size or ()) != (Q.GROUP, Q.GROUP):
                why.append(f"{where}: FP8Linear block size {m.block_size} (matvec_fp8 takes 128 x 128 blocks)")
            elif m.activation_scheme != "dynamic" or m.weight_scale_inv.dtype != torch.float32:
                why.append(f"{where}: FP8Linear with {m.activation_scheme} activations, scales "
                           f"{m.weight_scale_inv.dtype} (matvec_fp8: dynamic, fp32)")
    return why


class QuantLinear:
    """One projection as the decode step reads it: ``kind`` "int4" (``tensors`` = packed
    codes, scales, zeros), "fp8" (float8 weight, fp32 ``weight_scale_inv``) or "model" (the
    model's own weight: a layout the quantized kernels cannot take), and the bias."""

    __slots__ = ("kind", "tensors", "bias", "out_features")

    def __init__(self, kind: str, tensors: tuple, bias: Optional[torch.Tensor], out_features: int):
        self.kind, self.tensors, self.bias, self.out_features = kind, tensors, bias, out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` through the matvec of its kind (all rows in one launch)."""
        if x.requires_grad:  # the kernels keep no autograd graph: a silent zero gradient otherwise
            raise RuntimeError("tileflow: quantized projections have no gradient (tileflow.unpatch(model) to train)")
        x2 = x.reshape(-1, x.shape[-1])
        if self.kind == "int4":
            y = ops.matvec_int4(x2, *self.tensors, self.bias)
        elif self.kind == "fp8":
            y = ops.matvec_fp8(x2, *self.tensors, self.bias)
        else:
            y = ops.matvec(x2, self.tensors[0], self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def weight(self) -> torch.Tensor:
        """The fp32 weight the kernel multiplies by (dequantized)."""
        if self.kind == "int4":
            return Q.dequantize_int4(*self.tensors)
        if self.kind == "fp8":
            return Q.dequantize_fp8(*self.tensors)
        return self.tensors[0].float()


@torch.no_grad()
def quantize_linear(module, weights: str, dtype: torch.dtype) -> tuple[QuantLinear, str]:
    """(the projection ``module`` as a :class:`QuantLinear` for ``weights`` ("int4", "fp8",
    or "checkpoint": FP8Linear modules as they are, the rest unquantized), "" or why it stays
    in the model's dtype); activations, scales and biases in ``dtype``."""
    bias = None if module.bias is None else module.bias.to(dtype)  # (a copy only where the dtype differs)
    n, k = module.weight.shape
    if is_fp8_linear(module):  # the checkpoint's own tensors, where they lie
        return QuantLinear("fp8", (module.weight, module.weight_scale_inv), bias, n), ""
    if weights == "checkpoint":  # a projection the checkpoint left unquantized stays so
        return QuantLinear("model", (module.weight,), module.bias, n), "not FP8Linear in the checkpoint"
    if weights == "int4":
        if k % (2 * Q.GROUP):
            return QuantLinear("model", (module.weight,), module.bias, n), \
                f"K={k} is not a multiple of {2 * Q.GROUP} (int4 packing)"
        return QuantLinear("int4", Q.quantize_int4(module.weight, scale_dtype=dtype), bias, n), ""
    if weights == "fp8":
        return QuantLinear("fp8", Q.quantize_fp8(module.weight), bias, n), ""
    raise ValueError(f"tileflow: quantize_linear: weights={weights!r} (int4, fp8 or checkpoint)")


@torch.no_grad()
def relative_error(lin: QuantLinear, module, dtype: torch.dtype, seed: int) -> float:
    """:func:`probe_error` of ``lin`` against the module's weight in fp32: the model's bf16
    weight, or for an fp8 checkpoint its dequantized weight (then only the activations'
    quantization counts)."""
    w = Q.dequantize_fp8(module.weight, module.weight_scale_inv) if is_fp8_linear(module) else module.weight.float()
    return probe_error(lin, w, None if module.bias is None else module.bias.float(), dtype, seed)


def probe_error(compute, w: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, seed: int) -> float:
    """max |compute(x) - x @ w.T (+ bias)| / max |x @ w.T (+ bias)| on one random row x
    (``dtype``, from ``seed``), the exact side in fp32 (``w`` fp32): the error a report
    gives a quantized projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, w.shape[1], generator=g).to(device=w.device, dtype=dtype)
    exact = F.linear(x.float(), w, bias)
    got = compute(x).float()
    return float((got - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


@dataclass(frozen=True, slots=True)
class QuantLayer:
    """A decoder layer as the quantized step reads it: norms, projections, constants."""

    ln1: torch.Tensor
    eps1: float
    q: QuantLinear
    k: QuantLinear
    v: QuantLinear
    o: QuantLinear
    scale: float
    ln2: torch.Tensor
    eps2: float
    gate: QuantLinear
    up: QuantLinear
    down: QuantLinear
    qkv_kind: Optional[str] = None  # "int4" / "fp8": q, k, v through rms_norm_qkv_rope_cache; None: plain
    mlp_kind: Optional[str] = None  # gate and up through rms_norm_gate_up_silu
    o_kind: Optional[str] = None  # o_proj through matvec_residual
    down_kind: Optional[str] = None


FUSED = ("int4", "fp8")  # the kinds the fused quantized kernels take


def fused_kind(*lins: QuantLinear, biases: bool = False) -> Optional[str]:
    """The kind ("int4" / "fp8") of projections that one fused quantized kernel can run
    together (``biases``: all of them with a bias or none), else None."""
    kinds = {lin.kind for lin in lins}
    if len(kinds) != 1 or not kinds <= set(FUSED):
        return None
    with_bias = {lin.bias is not None for lin in lins}
    return kinds.pop() if (biases and len(with_bias) == 1) or with_bias == {False} else None


LARGE = 1 << 30  # projection bytes from which the progress bar shows even where stderr is not a terminal


def _progress(items, total: int, what: str, large: bool = False):
    """``items`` with a progress bar where stderr is a terminal, or always for a ``large``
    model (minutes of quantizing with no sign of life otherwise); tqdm, as transformers uses."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - transformers depends on tqdm
        return items
    return tqdm(items, total=total, desc=what, leave=False, disable=False if large else None)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def in_host_memory(where: str, op: str) -> RuntimeError:
    return RuntimeError(f"tileflow: {where}.weight is in host memory while the model is patched with "
                        f"quantized weights ({op} on it would be ignored): tileflow.unpatch(model) "
                        f"first, or assign a new nn.Parameter (the model is then patched again)")


class HostWeight(torch.Tensor):
    """What a projection's ``weight`` is while its original is on the host: the shape and
    dtype (what ``in_features`` / ``weight.dtype`` readers need), no storage (device ``meta``),
    and a one-line error for any op on its values (``copy_``, ``load_state_dict``, ``.to``):
    the module computes with its quantized copy, so a write here would be silently ignored."""

    @staticmethod
    def __new__(cls, shape, dtype, where: str):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")
        t.where = where
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter and state_dict detach: the same placeholder
            return HostWeight(args[0].shape, args[0].dtype, args[0].where)
        where = next(a.where for a in args if isinstance(a, HostWeight))
        raise in_host_memory(where, func.overloadpacket.__name__)

    def __repr__(self, *, tensor_contents=None):
        return f"HostWeight({tuple(self.shape)}, {self.dtype}: {self.where}.weight in host memory while patched)"


@torch.no_grad()
def put_back(entries) -> None:
    """Each (module, its original Parameter, what took its place, the original's device): the
    original back on its device and in its module, unless the weight was replaced since."""
    for module, original, placed, device in entries:
        if module._parameters.get("weight") is not placed:
            continue
        if original.device != device:
            original.data = original.data.to(device)
        module._parameters["weight"] = original


class HostStash:
    """The projections' original weights while patched: moved to host memory (pinned on CUDA)
    and given back by :meth:`restore`; their modules' ``weight`` a :class:`HostWeight`."""

    def __init__(self):
        # (module, the original Parameter, the placeholder put in its place, its device)
        self.entries: list[tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.Parameter, torch.device]] = []
        self.handles = []

    @torch.no_grad()
    def stash(self, module: torch.nn.Module, where: str) -> None:
        param = module.weight
        device = param.device
        if device.type == "cuda":
            host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)  # pinned: unpatch copies back fast
            host.copy_(param)
            param.data = host  # the same Parameter object (optimizers, user references) now on the host
        # on CPU the host is the device: a reference (a copy would double the bytes and give nothing back)
        placeholder = torch.nn.Parameter(HostWeight(param.shape, param.dtype, where), requires_grad=False)
        module._parameters["weight"] = placeholder  # not setattr: the registration hooks would mark a replacement

        def original_in_state_dict(mod, state_dict, prefix, local_metadata, _param=param, _placeholder=placeholder):
            if mod._parameters.get("weight") is _placeholder:
                state_dict[prefix + "weight"] = _param.detach()

        def refuse_load(mod, state_dict, prefix, local_metadata, *_, _placeholder=placeholder):
            # before torch's per-weight copy: one line, not a warning a weight then the same error
            if mod._parameters.get("weight") is _placeholder and prefix + "weight" in state_dict \
                    and not local_metadata.get("assign_to_params_buffers", False):
                raise in_host_memory(where, "load_state_dict")

        self.handles.append(module.register_state_dict_post_hook(original_in_state_dict))
        self.handles.append(module.register_load_state_dict_pre_hook(refuse_load))
        self.entries.append((module, param, placeholder, device))

    @torch.no_grad()
    def restore(self) -> None:
        """The originals back on their device and in their modules; a weight the user
        replaced since (a new Parameter or module) stays theirs, its original dropped."""
        for handle in self.handles:
            handle.remove()
        put_back(self.entries)
        self.entries, self.handles = [], []

    @staticmethod
    def guard_apply():
        """``model._apply`` (``.to``, ``.cuda``, ``.half``...) refused before anything moves:
        the originals on the host would not follow (half the model converted otherwise)."""

        def _apply(*args, **kwargs):
            raise RuntimeError("tileflow: model.to / .cuda / .half / .float on a model patched with quantized "
                               "weights (its projections' weights are in host memory): tileflow.unpatch(model), "
                               "convert, then patch again")

        return _apply


class QuantizedDecodeProgram:
    """The decode step of a Qwen2 / Llama ``model`` on quantized projections (see the module
    docstring). Built once at patch time: quantizes (``weights`` "int4" / "fp8"; an fp8
    checkpoint's FP8Linear tensors are read where they lie), measures each projection's
    error, and says both in ``notes`` / ``errors``. Layer by layer, each layer's originals
    leave for the host (``self.host``) once it is quantized: peak device memory is the model
    as loaded plus one projection's fp32 quantization temporaries (about 3x its bf16 bytes,
    under one layer's bf16)."""

    fallback_runs = "the model's forward (its projections through the quantized matvecs)"

    def __init__(self, model, rope_cfg: ops.RopeConfig, weights: str):
        cfg = model.config
        base = model.model
        self.rope_cfg = rope_cfg
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.dh = base.layers[0].self_attn.head_dim
        self.embed = base.embed_tokens.weight
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight
        dtype = self.embed.dtype
        checkpoint = fp8_checkpoint(model)
        self.kind = "fp8 (the checkpoint's FP8Linear tensors)" if checkpoint else weights
        # name -> (QuantLinear, module) of every projection; errors: name -> max relative error
        self.linears: dict[str, tuple[QuantLinear, torch.nn.Module]] = {}
        self.errors: dict[str, float] = {}
        self.kept: dict[str, str] = {}  # projections left in the model's dtype, and why
        self.layers = []
        layers = base.layers
        self.host = HostStash()
        self.device = self.embed.device
        self.bytes_before = nbytes(getattr(getattr(layer, part), name).weight for layer in layers
                                   for part, name in PROJECTIONS)
        try:
            self._quantize(layers, weights, checkpoint, dtype)
        except BaseException:  # half-quantized: the layers done so far get their weights back
            self.host.restore()
            raise
        self.bytes_after = nbytes(t for lin, _ in self.linears.values() for t in lin.tensors)
        self.matches = self._matches()

    def _matches(self) -> dict[str, int]:
        """The kernels of one step, as the report counts them: each fused quantized kernel
        (named by kind), and the plain matvecs of the groups that could not fuse."""
        kernels = {"int4": "matvec_int4", "fp8": "matvec_fp8", "model": "matvec"}
        counts: dict[str, int] = {}

        def add(name, n=1):
            counts[name] = counts.get(name, 0) + n

        n = len(self.layers)
        for w in self.layers:
            if w.qkv_kind:
                add(f"rms_norm_qkv_rope_cache_{w.qkv_kind}")
            else:
                for lin in (w.q, w.k, w.v):
                    add(kernels[lin.kind])
                add("rms_norm")
                add("rope", 2)
            if w.mlp_kind:
                add(f"rms_norm_gate_up_silu_{w.mlp_kind}")
            else:
                for lin in (w.gate, w.up):
                    add(kernels[lin.kind])
                add("rms_norm")
                add("silu_mul")
            for kind, lin in ((w.o_kind, w.o), (w.down_kind, w.down)):
                if kind:
                    add(f"matvec_residual_{kind}")
                else:
                    add(kernels[lin.kind])
                    add("residual_add")
        counts.update({"embedding": 1, "gqa_attention": n, "rms_norm_matvec": 1})
        return counts

    def _quantize(self, layers, weights: str, checkpoint: bool, dtype: torch.dtype) -> None:
        """Each layer's projections quantized, measured, then their originals to the host."""
        large = self.bytes_before >= LARGE
        for i, layer in _progress(enumerate(layers), len(layers), f"tileflow: quantizing ({weights})", large):
            made = {}
            for part, name in PROJECTIONS:
                module = getattr(getattr(layer, part), name)
                where = f"model.layers.{i}.{part}.{name}"
                lin, why = quantize_linear(module, "checkpoint" if checkpoint else weights, dtype)
                made[name] = lin
                self.linears[where] = (lin, module)
                if lin.kind == "model":
                    self.kept[where] = why
                else:
                    self.errors[where] = relative_error(lin, module, dtype, seed=len(self.errors))
            for part, name in PROJECTIONS:  # a checkpoint's FP8Linear and "model" kinds compute on their own weight
                where = f"model.layers.{i}.{part}.{name}"
                if not checkpoint and self.linears[where][0].kind != "model":
                    self.host.stash(self.linears[where][1], where)
            a = layer.self_attn
            q, k, v, o = made["q_proj"], made["k_proj"], made["v_proj"], made["o_proj"]
            gate, up, down = made["gate_proj"], made["up_proj"], made["down_proj"]
            self.layers.append(QuantLayer(
                ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon,
                q=q, k=k, v=v, o=o, scale=a.scaling,
                ln2=layer.post_attention_layernorm.weight, eps2=layer.post_attention_layernorm.variance_epsilon,
                gate=gate, up=up, down=down, qkv_kind=fused_kind(q, k, v, biases=True),
                mlp_kind=fused_kind(gate, up), o_kind=fused_kind(o), down_kind=fused_kind(down)))

    @property
    def takes_any_position(self) -> bool:
        """As :class:`DecodeProgram`: rotates at the given position, writes at the cache's count."""
        return True

    def notes(self) -> list[str]:
        """What the report says: the kind, each layer's measured error, what stayed in the model's dtype."""
        per_layer: dict[str, dict[str, float]] = {}
        for where, err in self.errors.items():
            layer, _, name = where.rpartition(".")
            per_layer.setdefault(layer.rsplit(".", 1)[0], {})[name] = err
        lines = [f"weights {self.kind}: {len(self.errors)} projections quantized (q/k/v/o, gate/up/down of "
                 f"{len(self.layers)} layers); embeddings, norms and lm_head in the model's dtype"]
        plain = [f"model.layers.{i}" for i, w in enumerate(self.layers)
                 if not (w.qkv_kind and w.mlp_kind and w.o_kind and w.down_kind)]
        if plain:  # a projection of another kind (or a bias) in a group: that group's plain sequence
            lines.append(f"weights {self.kind}: {', '.join(plain)}: not every projection in a fused quantized "
                         f"kernel (the rest as a plain sequence of kernels)")
        moved = nbytes(param for _, param, _, _ in self.host.entries)
        lines.append(f"weights {self.kind}: projections on {self.device}: {self.bytes_before / 2**20:.1f} MiB before, "
                     f"{self.bytes_after / 2**20:.1f} MiB after; {moved / 2**20:.1f} MiB of original weights in host "
                     f"memory until unpatch" + (" (pinned)" if self.device.type == "cuda" else
                                                 " (on CPU the same tensors: no memory saved there)"))
        for layer, errs in per_layer.items():
            worst = max(errs, key=errs.get)
            detail = ", ".join(f"{k.removesuffix('_proj')} {v:.2e}" for k, v in errs.items())
            lines.append(f"weights {self.kind}: {layer}: max relative error {errs[worst]:.2e} ({worst}); {detail}")
        lines += [f"weights {self.kind}: {where} kept in the model's dtype: {why}" for where, why in self.kept.items()]
        return lines

    def install_forwards(self) -> list:
        """Give each projection module a forward through its quantized matvec (the model's own
        forward then computes what the program computes: prompts, fallbacks); returns the
        modules, whose ``forward`` ``unpatch`` removes."""
        modules = []
        for lin, module in self.linears.values():
            module.forward = torch.compiler.disable(lin)
            modules.append(module)
        return modules

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache, key_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Logits [B * R, V] of ``tok`` [B, R] at ``pos`` [B, R], as ``DecodeProgram.run`` (the
        same cache rows, key mask, verify rows), through the quantized projections."""
        b, r = tok.shape
        m = b * r
        p = pos.reshape(m)
        rows, lengths = step_rows(cache, p, b, r)
        row = rows[:r]  # index_copy_ writes the R rows of every sequence at once
        cache_pos = None if rows is p else rows  # the cache's own count: where K/V go (rotated at p)
        x = ops.embedding_lookup(tok.reshape(m), self.embed)
        nh, nkv, dh = self.nh, self.nkv, self.dh
        for w, layer in zip(self.layers, cache.layers):
            if w.qkv_kind:  # K and V written into the cache inside
                q = ops.rms_norm_qkv_rope_cache_quant(w.qkv_kind, x, w.ln1, w.eps1, w.q.tensors, w.k.tensors,
                                                      w.v.tensors, w.q.bias, w.k.bias, w.v.bias, p, layer.keys,
                                                      layer.values, self.rope_cfg, cache_pos)
            else:
                h = ops.rms_norm(x, w.ln1, w.eps1)
                q = ops.rope_q(w.q(h).view(m, nh, dh), p, self.rope_cfg)
                k = ops.rope_q(w.k(h).view(m, nkv, dh), p, self.rope_cfg)
                v = w.v(h)
                # K/V into the cache rows, as StaticLayer.update writes them (every sequence the same rows)
                layer.keys.index_copy_(2, row, k.view(b, r, nkv, dh).transpose(1, 2))
                layer.values.index_copy_(2, row, v.view(b, r, nkv, dh).transpose(1, 2))
            o = ops.gqa_attention(q.view(b, r, nh, dh) if r > 1 else q, layer.keys, layer.values, lengths, w.scale,
                                  key_mask=key_mask)
            x = self._residual(w.o_kind, w.o, o.reshape(m, nh * dh), x)
            if w.mlp_kind:
                act = ops.rms_norm_gate_up_silu_quant(w.mlp_kind, x, w.ln2, w.eps2, w.gate.tensors, w.up.tensors)
            else:
                h = ops.rms_norm(x, w.ln2, w.eps2)
                act = ops.silu_mul(w.gate(h), w.up(h))
            x = self._residual(w.down_kind, w.down, act, x)
        logits = ops.rms_norm_matvec(x, self.norm_w, self.norm_eps, self.lm_head_w)
        _advance(cache, r)
        return logits

    @staticmethod
    def _residual(kind: Optional[str], lin: QuantLinear, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x + lin(a)``: one fused launch where ``kind`` says so, else the matvec and residual_add."""
        if kind:
            return ops.matvec_residual_quant(kind, a, lin.tensors, x)
        return ops.residual_add(lin(a), x)
