"""Suite kernels as torch functions: what the integrations call.

Each function takes torch tensors (Hugging Face layouts) and returns new tensors. On
a GPU it launches the generated Triton kernel with the launch parameters measured
for this device and shape (``tileflow/data/autotune.json`` or the user cache), else
the definition's defaults. On CPU it runs the kernel's reference with fp32
arithmetic, or, with the option ``cpu_target="triton"`` (``TILEFLOW_CPU_TARGET``), the
generated Triton code under the interpreter (how the tests check the integrations
against the real kernels).

Each function names the kernel's tensors and scalars; :func:`launch` binds them
through the kernel's calling convention, derived from its tile definition
(:mod:`tileflow.runtime.binding`): the argument order, the sizes (read off the shapes)
and the outputs to allocate are nowhere restated here. A binding is resolved once per
call site and sizes; per (kernel, sizes, dtype, device) the chosen parameters, the IR
and the launcher are built once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tileflow import settings
from tileflow.suite import KERNELS
from tileflow.suite.rope import ROPE_SCALARS


class _Launchers(dict):
    """The launchers, by (kernel, sizes, dtype, device type, device index). Clearing it, or
    removing an entry, drops every resolved call plan as well (``launch``), so the next
    calls build their launchers again: how the tests and the step tuner rebuild them."""

    def clear(self) -> None:
        super().clear()
        _SITES.clear()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        _SITES.clear()

    def pop(self, *args):
        _SITES.clear()
        return super().pop(*args)

    def popitem(self):
        _SITES.clear()
        return super().popitem()


_LAUNCHERS: dict[tuple, Callable] = _Launchers()


def cpu_target() -> str:
    """"reference" (default) or "triton" (the interpreter) for CPU tensors: the option
    ``cpu_target`` of the environment's options (read at each launcher's build)."""
    return settings.ENVIRONMENT.cpu_target


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tuned_params(name: str, sizes: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The definition's defaults, then the measured parameters for this device and shape
    (``emit.autotune.lookup``), then the structural sizes."""
    from tileflow.emit import autotune

    kernel = KERNELS[name]
    tuned = autotune.lookup(name, sizes, DTYPE_NAMES[dtype], _device_name(device)) or {}
    params = {**kernel.default_params(sizes), **tuned, **kernel.structural_sizes(sizes)}
    # LAUNCH_AT_START only as the caller says (``_at_start``), never from a table: the
    # launch after one that sets it must not load early inputs, which only the caller knows
    for flag in autotune.CALLER_FLAGS:
        params.pop(flag, None)
        if sizes.get(flag):
            params[flag] = sizes[flag]
    return params


def launch_params(name: str, sizes: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The parameters a launch of suite kernel ``name`` at ``sizes`` uses on ``device``:
    :func:`tuned_params` (the reference path on CPU takes the defaults)."""
    if device.type == "cpu" and cpu_target() == "reference":
        return KERNELS[name].default_params(sizes)
    return tuned_params(name, sizes, dtype, device)


def _launcher(name: str, sizes: dict, dtype: torch.dtype, device: torch.device, convention=None) -> Callable:
    """The launcher of suite kernel ``name`` at ``sizes`` (positional arguments in the
    generated ``launch``'s order), built once; a ``convention``
    (:class:`tileflow.runtime.binding.Convention`) is checked against the IR it builds."""
    key = (name, tuple(sorted(sizes.items())), dtype, device.type, device.index)
    fn = _LAUNCHERS.get(key)
    if fn is not None:
        return fn
    kernel = KERNELS[name]
    if device.type == "cpu" and cpu_target() == "reference":
        ir = kernel.build(kernel.default_params(sizes))
        fn = _reference_launcher(kernel, ir)
    else:
        from tileflow.runtime.torch_triton import torch_launcher

        ir = kernel.build(launch_params(name, sizes, dtype, device))
        fn = torch_launcher(ir, device.type, sizes)
    if convention is not None:
        convention.matches(ir)
    _LAUNCHERS[key] = fn
    return fn


def _reference_launcher(kernel, ir) -> Callable:
    """The reference with fp32 arithmetic, writing into the given outputs (and
    in-place views): a drop-in for the generated ``launch`` of ``ir``."""
    import array_api_compat

    names = [v.name for v in ir.arguments]
    read = {v.name for v in ir.views if v.role in ("input", "inout")}
    scalar_names = [s.name for s in ir.scalars]

    def launch(*args):
        tensors = dict(zip(names, args[:len(names)]))
        scalars = dict(zip(scalar_names, args[len(names):]))
        inputs = {n: (t.float() if t.is_floating_point() else t) for n, t in tensors.items() if n in read}
        xp = array_api_compat.array_namespace(*inputs.values())
        for n, r in kernel.run_reference(xp, **inputs, **scalars).items():
            tensors[n].copy_(r)

    return launch


_INDEX = {"i64": torch.int64, "i32": torch.int32, "f32": torch.float32}
_SITES: dict[tuple, "_Site"] = {}
_MAX_PLANS = 256  # per call site: a growing cache length makes a plan per length


def launch(kernel: str, values: dict, sizes: Optional[dict] = None, tune: Optional[dict] = None) -> tuple:
    """Run suite kernel ``kernel`` on NAMED tensors and scalars ``values`` (absent optional
    tensors left out, not None); returns its outputs (``role == "output"``, in the
    kernel's order), allocated unless given; in-place views are written in place.

    ``sizes``: the structural flags (``HAS_BIAS``, ``ROPE_KIND``, ``EARLY_INPUTS``, ...) and
    any size no given tensor has; the rest come from the shapes
    (:mod:`tileflow.runtime.binding`). ``tune``: sizes the launch parameters are chosen
    for instead of the derived ones (a bucketed cache capacity).

    The binding is resolved once per call site (kernel, names, sizes) and once per
    (shapes, dtype, device), where names and shapes are checked (one-line errors) and the
    launcher is found; a call after that reads the shapes, looks up its plan, allocates
    the outputs and launches."""
    key = (kernel, tuple(values), tuple(sizes.items()) if sizes else (), tuple(tune.items()) if tune else ())
    site = _SITES.get(key)
    if site is None:
        site = _SITES[key] = _Site(kernel, values, sizes, tune)
    return site(values)


class _Site:
    """A call site: one kernel, the names it is called with, its flags and tuned sizes."""

    def __init__(self, kernel: str, values: dict, sizes: Optional[dict], tune: Optional[dict]):
        from tileflow.runtime import binding

        self.kernel, self.tune = kernel, dict(tune or {})
        self.conv = conv = binding.convention(kernel, sizes)
        absent = [n for n, v in values.items() if v is None]
        if absent:
            raise binding.BindingError(f"tileflow: {kernel}: leave absent tensors out instead of passing None "
                                       f"({', '.join(absent)})")
        conv.check_names(values)
        self.storage = next((t.name for t in conv.tensors if t.dtype == "T" and t.name in values), None)
        if self.storage is None:
            raise binding.BindingError(f"tileflow: {kernel}: no floating tensor given")
        self.tensors = tuple(t.name for t in conv.tensors if t.name in values)
        self.plans: dict[tuple, _Plan] = {}

    def __call__(self, values: dict) -> tuple:
        s = values[self.storage]
        # the shapes are the sizes: a plan per shape set is checked once, when it is made
        key = (s.dtype, s.device, *[values[n].shape for n in self.tensors])
        plan = self.plans.get(key)
        if plan is None or plan.launchers is not _LAUNCHERS:  # (the launchers were replaced)
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            plan = self.plans[key] = self._plan(values, s)
        return plan(values)

    def _plan(self, values: dict, s: torch.Tensor) -> "_Plan":
        conv = self.conv
        sizes = conv.sizes(values)  # every name, rank and shape checked here, once
        fn = _launcher(self.kernel, {**sizes, **self.tune}, s.dtype, s.device, conv)
        slots = []
        for t in conv.tensors:
            if t.name in values:
                slots.append((t.name, None))
            else:
                slots.append((t.name, (conv.shape(t.name, sizes), s.dtype if t.dtype == "T" else _INDEX[t.dtype],
                                       s.device)))
        slots += [(n, None) for n in conv.scalars]
        outputs = tuple(i for i, t in enumerate(conv.tensors) if t.role == "output")
        return _Plan(fn, tuple(slots), outputs, _LAUNCHERS)


class _Plan:
    """A resolved binding: the launcher, what to pass (or allocate) in order, which
    arguments are the outputs, and the launcher table it came from."""

    __slots__ = ("fn", "slots", "outputs", "launchers")

    def __init__(self, fn: Callable, slots: tuple, outputs: tuple, launchers: dict):
        self.fn, self.slots, self.outputs, self.launchers = fn, slots, outputs, launchers

    def __call__(self, values: dict) -> tuple:
        args = [values[n] if spec is None else torch.empty(spec[0], dtype=spec[1], device=spec[2])
                for n, spec in self.slots]
        self.fn(*args)
        return tuple(args[i] for i in self.outputs)


def _early(early: bool) -> dict:
    """``EARLY_INPUTS`` when the caller vouches for it: the kernel's inputs other than its
    main activation were written two or more kernels back (never by the kernel just
    before), so they may load before the dependent-launch wait."""
    return {"EARLY_INPUTS": 1} if early else {}


def _at_start(at_start: bool) -> dict:
    """``LAUNCH_AT_START`` when the caller asks for it: the kernel's programs let the next
    launch in at their start, before their own dependent-launch wait, instead of after it.
    The next launch may then start while the launch before this one still runs, so the
    caller must not let it load early inputs (``_early``): only weights before its wait."""
    return {"LAUNCH_AT_START": 1} if at_start else {}


def _capacity_bucket(s: int) -> int:
    """An attention's cache capacity as its launch parameters see it: they depend on it only
    through SPLITS, so a power of two (a growing, dynamic cache builds no launcher per length)."""
    return 1 << max(0, (s - 1).bit_length())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of a 2-D ``x`` with gamma ``w``."""
    return launch("rms_norm", {"x": x, "w": w, "eps": eps})[0]


def matvec(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for a 2-D ``x`` (decode: one row)."""
    if b is None:
        return launch("matvec", {"x": x, "w": w}, {"HAS_BIAS": 0})[0]
    return launch("matvec", {"x": x, "w": w, "b": b}, {"HAS_BIAS": 1})[0]


def matvec_pair(x, wk, wv, bk=None, bv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ``x @ wk.T + bk`` and ``x @ wv.T + bv`` in one launch."""
    if bk is None:
        return launch("matvec_pair", {"x": x, "wk": wk, "wv": wv}, {"HAS_BIAS": 0})
    return launch("matvec_pair", {"x": x, "wk": wk, "wv": wv, "bk": bk, "bv": bv}, {"HAS_BIAS": 1})


def matvec_residual(x, w, r, early: bool = False, at_start: bool = False) -> torch.Tensor:
    """``x @ w.T + r``: the attention output or MLP down projection with the residual
    (``early``: the caller vouches that ``r`` is not the previous kernel's output, see ``_early``;
    ``at_start``: the next launch is let in at the programs' start, see ``_at_start``)."""
    return launch("matvec_residual", {"x": x, "w": w, "r": r}, {**_early(early), **_at_start(at_start)})[0]


def gate_up_silu(x, wg, wu) -> torch.Tensor:
    """``silu(x @ wg.T) * (x @ wu.T)``."""
    return launch("gate_up_silu", {"x": x, "wg": wg, "wu": wu})[0]


@dataclass(frozen=True)
class RopeConfig:
    """RoPE constants of a model: kind (0 default, 1 linear, 2 llama3) and the runtime
    scalars of that kind, in kernel order (``tileflow.suite.rope.ROPE_SCALARS``).
    Framework-free: ``tileflow.integrations.transformers.compat.rope_config_of`` reads
    one off a transformers config."""

    kind: int
    scalars: tuple

    @functools.cached_property
    def named(self) -> dict:
        """The scalars by the names the rope kernels take them."""
        return dict(zip(ROPE_SCALARS[self.kind], self.scalars))


def rope_q(x: torch.Tensor, pos: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotary embedding of ``x`` [M, H, DH] at positions ``pos`` [M] (int64)."""
    return launch("rope_q", {"x": x, "pos": pos, **cfg.named}, {"ROPE_KIND": cfg.kind})[0]


def gqa_attention(q, k_cache, v_cache, lengths, scale: float,
                  key_mask: Optional[torch.Tensor] = None, early: bool = False, at_start: bool = False
                  ) -> torch.Tensor:
    """GQA decode attention of ``q`` [B, NH, DH] over the first ``lengths[b]``
    positions of the caches [B, NKV, S, DH]; with ``key_mask`` [B, S] (int32), only
    over the positions where it is nonzero. ``q`` [B, R, NH, DH]: R consecutive new
    tokens of each sequence (a speculative verify step), row i causal over the first
    ``lengths[b] - R + 1 + i`` positions. ``early``: the caller vouches that
    ``lengths`` is not the previous kernel's output (``_early``); ``at_start``: both launches
    let the next one in at their programs' start (``_at_start``)."""
    values = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths, "scale": scale}
    flags = {**_early(early), **_at_start(at_start)}
    if q.dim() == 4:
        flags["ROWS"] = q.shape[1]
    if key_mask is not None:
        values["key_mask"] = key_mask
        flags = {"HAS_MASK": 1, **flags}
    return launch("gqa_attention", values, flags, {"S": _capacity_bucket(k_cache.shape[2])})[0]


def argmax_greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens of 2-D logits (int64), ties to the lowest index."""
    return launch("argmax_greedy", {"logits": logits})[0]


def rms_norm_matvec(x: torch.Tensor, ln_w: torch.Tensor, eps: float, w: torch.Tensor,
                    b: Optional[torch.Tensor] = None, at_start: bool = False) -> torch.Tensor:
    """``rms_norm(x, ln_w, eps) @ w.T (+ b)`` in one launch (final norm + lm_head;
    ``at_start``: see ``_at_start``)."""
    if b is None:
        return launch("rms_norm_matvec", {"x": x, "ln_w": ln_w, "w": w, "eps": eps},
                      {"HAS_BIAS": 0, **_at_start(at_start)})[0]
    return launch("rms_norm_matvec", {"x": x, "ln_w": ln_w, "w": w, "b": b, "eps": eps},
                  {"HAS_BIAS": 1, **_at_start(at_start)})[0]


def rms_norm_gate_up_silu(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wg: torch.Tensor,
                          wu: torch.Tensor, at_start: bool = False) -> torch.Tensor:
    """``silu(n @ wg.T) * (n @ wu.T)`` with ``n = rms_norm(x, ln_w, eps)``, one launch
    (``at_start``: see ``_at_start``)."""
    return launch("rms_norm_gate_up_silu", {"x": x, "ln_w": ln_w, "wg": wg, "wu": wu, "eps": eps},
                  _at_start(at_start))[0]


def _cache_rows(x: torch.Tensor, k_cache: torch.Tensor, cache_pos: Optional[torch.Tensor], values: dict,
                sizes: dict) -> None:
    """The q/k/v kernels' cache rows: ``cache_pos`` where given (CACHE_POS), and ROWS tokens a
    sequence where x has more rows than the caches have sequences (a verify step)."""
    if cache_pos is not None:
        values["cache_pos"] = cache_pos
        sizes["CACHE_POS"] = 1
    if x.shape[0] != k_cache.shape[0]:
        sizes["ROWS"] = x.shape[0] // k_cache.shape[0]


def qkv_rope_cache(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
                   wv: torch.Tensor, bq: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                   bv: Optional[torch.Tensor], pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cfg: Optional[RopeConfig] = None, cache_pos: Optional[torch.Tensor] = None,
                   inv_freq: Optional[torch.Tensor] = None, early: bool = False, at_start: bool = False
                   ) -> torch.Tensor:
    """The attention input of a decode layer in one launch: RMSNorm of ``x`` [M, D], the
    q/k/v projections (+ biases), RoPE at ``pos`` [M]; K and V are written into row
    ``pos`` of the caches [B, NKV, S, DH] in place; returns q [M, NH, DH]. M = B (one
    token a sequence) or B * R (R consecutive tokens of each, a speculative verify step).

    The rotation's frequencies come from ``cfg`` or, as a compiled transformers graph
    has them, from ``inv_freq`` [DH/2] (fp32); ``cache_pos`` [M], when given, is the row
    K and V go to (the graph writes at the cache's own count, rotates at ``pos``).
    ``early``: the caller vouches that the positions are not the previous kernel's output;
    ``at_start``: the next launch is let in at the programs' start (``_at_start``)."""
    values = {"x": x, "ln_w": ln_w, "wq": wq, "wk": wk, "wv": wv, "pos": pos, "k_cache": k_cache,
              "v_cache": v_cache, "eps": eps}
    # q [M, NH, DH] is allocated here: its head count is the only size no input has
    sizes = {"NH": wq.shape[0] // k_cache.shape[3], "HAS_BIAS": int(bq is not None),
             "ROPE_KIND": 3 if inv_freq is not None else cfg.kind}
    if bq is not None:
        values.update(bq=bq, bk=bk, bv=bv)
    _cache_rows(x, k_cache, cache_pos, values, sizes)
    if x.shape[0] == k_cache.shape[0] > 1:  # a batch, one token a sequence: up to 16 rows a program, not one
        sizes["PROGRAM_ROWS"] = min(x.shape[0], 16)
    if inv_freq is not None:
        values["inv_freq"] = inv_freq
    else:
        values.update(cfg.named)
    return launch("qkv_rope_cache", values, {**sizes, **_early(early), **_at_start(at_start)})[0]


def embedding_lookup(ids: torch.Tensor, table: torch.Tensor, at_start: bool = False) -> torch.Tensor:
    """Rows of ``table`` for the 1-D int64 ``ids``. An id outside ``[0, V)`` raises
    IndexError on CPU, as the model's embedding does; on a GPU (no host read per token)
    the kernel gives that row as NaN and reads nothing outside the table (``at_start``:
    see ``_at_start``)."""
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"tileflow: token id {bad} is out of range for an embedding of {table.shape[0]} rows")
    return launch("embedding_lookup", {"ids": ids, "table": table}, _at_start(at_start))[0]


# --- DeepSeek-V2 / V3: multi-head latent attention over the latent cache, routed experts ---


def mla_latent_cache(x: torch.Tensor, w_kva: torch.Tensor, ln_w: torch.Tensor, eps: float, pos: torch.Tensor,
                     inv_freq: torch.Tensor, rope_scale: float, rope_layout: int, kv_cache: torch.Tensor,
                     pe_cache: torch.Tensor, cache_pos: Optional[torch.Tensor] = None,
                     x_norm: Optional[tuple[torch.Tensor, float]] = None) -> None:
    """The latent cache rows of the normed inputs ``x`` [M, D], written in place at row
    ``pos[m]`` (int64 [M], also the rope position): ``kv_cache`` [M, S, R] gets
    ``kv_a_layernorm`` (``ln_w``, ``eps``) of the compressed part of ``x @ w_kva.T``,
    ``pe_cache`` [M, S, DR] its rope part rotated with ``inv_freq`` [DR/2] (fp32), cos and
    sin times ``rope_scale``, in pair layout ``rope_layout`` (0 rotate-half, 1 interleaved
    in / halves out, 2 interleaved in and out: ``tileflow.suite.mla_latent_cache``).
    ``cache_pos`` [M] (int64), when given, is the row written instead (a static cache's own
    count), the rotation still at ``pos``; a row outside the cache is not written. With
    ``x_norm`` (gamma, eps) ``x`` is the layer's input and its RMSNorm is applied inside."""
    values = {"x": x, "w_kva": w_kva, "ln_w": ln_w, "pos": pos, "inv_freq": inv_freq, "kv_cache": kv_cache,
              "pe_cache": pe_cache, "eps": eps, "rope_scale": rope_scale, "rope_layout": rope_layout}
    flags = {"ROPE_LAYOUT": rope_layout}
    if cache_pos is not None:
        values["cache_pos"] = cache_pos
        flags["CACHE_POS"] = 1
    if x_norm is not None:
        values.update(x_ln=x_norm[0], x_eps=x_norm[1])
        flags["NORM"] = 1
    launch("mla_latent_cache", values, flags)


@dataclass(frozen=True)
class MlaRope:
    """The query rope mla_attention applies itself: positions ``pos`` [B] (int64), the
    rotary table ``inv_freq`` [DR/2] (fp32), cos / sin times ``scale``, pairs in
    mla_latent_cache's ``layout``."""
    pos: torch.Tensor
    inv_freq: torch.Tensor
    scale: float
    layout: int


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                  lengths: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                  key_mask: Optional[torch.Tensor] = None, rope: Optional[MlaRope] = None) -> torch.Tensor:
    """MLA decode attention of one new token a sequence, absorbed: ``q_nope`` [B, NH, DN]
    and the rotated ``q_pe`` [B, NH, DR] over the first ``lengths[b]`` rows of the latent
    caches ``kv_cache`` [B, S, R] / ``pe_cache`` [B, S, DR]; ``w_uk`` [NH, DN, R] and
    ``w_uv`` [NH, DV, R] are ``kv_b_proj.weight`` viewed [NH, DN + DV, R] and split (views);
    with ``key_mask`` [B, S] (int32) only where it is nonzero; with ``rope`` ``q_pe`` is
    not rotated yet and the kernel rotates it (as mla_latent_cache the key). Returns [B, NH, DV]."""
    values = {"q_nope": q_nope, "q_pe": q_pe, "kv_cache": kv_cache, "pe_cache": pe_cache, "lengths": lengths,
              "w_uk": w_uk, "w_uv": w_uv, "scale": scale}
    flags = {}
    if key_mask is not None:
        values["key_mask"] = key_mask
        flags["HAS_MASK"] = 1
    if rope is not None:
        values.update(pos=rope.pos, inv_freq=rope.inv_freq, rope_scale=rope.scale, rope_layout=rope.layout)
        flags.update(ROPE_Q=1, ROPE_LAYOUT=rope.layout)
    return launch("mla_attention", values, flags, {"S": _capacity_bucket(kv_cache.shape[1])})[0]


def moe_router(x: torch.Tensor, w: torch.Tensor, top_k: int, scale: float, n_group: int = 1, topk_group: int = 1,
               norm_topk: bool = False, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeekMoE's gate for the rows of ``x`` [M, D] with the router weight ``w`` [E, D]
    (fp32, or x's dtype: upcast in the kernel): (topk_idx [M, top_k] int64, best first; topk_weight [M, top_k] fp32). Without
    ``bias``: DeepSeek-V2's softmax scores; with ``bias`` (``e_score_correction_bias`` [E],
    fp32): DeepSeek-V3's sigmoid scores chosen with the bias. The best ``topk_group`` of
    ``n_group`` groups are kept, the weights normalised where ``norm_topk``, times ``scale``."""
    values = {"x": x, "w": w, "scale": scale, "top_k": top_k, "n_group": n_group, "topk_group": topk_group,
              "norm_topk": int(norm_topk)}
    if bias is not None:
        values["bias"] = bias
    # K sizes the outputs (no input has it); METHOD picks the scores; WEIGHT_T: w in x's dtype
    flags = {"K": top_k, "METHOD": int(bias is not None)}
    if w.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"tileflow: moe_router takes an fp32 router weight or one in x's dtype, not {w.dtype}")
    if w.dtype == x.dtype != torch.float32:
        flags["WEIGHT_T"] = 1
    return launch("moe_router", values, flags)


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, residual: Optional[torch.Tensor] = None,
                shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``sum_j topk_weight[m, j] * down_e(silu(gate_e(x[m])) * up_e(x[m]))`` over the chosen
    experts ``e = topk_idx[m, j]`` (+ ``residual`` [M, D]), reading only those experts'
    weights: ``gate_up`` is ``gate_up_proj`` [E, 2I, D] viewed [E, 2, I, D], ``down`` is
    ``down_proj`` [E, D, I], as transformers keeps them. With ``shared`` (the shared experts'
    gate, up [NS * I, D] and down [D, NS * I] weights) their MLP is added in the same launches."""
    values = {"x": x, "topk_idx": topk_idx, "topk_weight": topk_weight, "gate_up": gate_up, "down": down}
    flags = {"HAS_RESIDUAL": int(residual is not None)}
    if residual is not None:
        values["residual"] = residual
    if shared is not None:
        if shared[0].shape[0] % gate_up.shape[2]:
            raise ValueError(f"tileflow: shared experts of {shared[0].shape[0]} rows, not slices of {gate_up.shape[2]}")
        values.update(s_gate=shared[0], s_up=shared[1], s_down=shared[2])
        flags["SHARED"] = 1
    return launch("moe_experts", values, flags)[0]


# --- low-precision weights (issue 35): the int4 / fp8 matvecs, their fused forms, and the
# elementwise kernels the quantized decode step runs where it cannot fuse ---


def matvec_int4(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dequant(W).T (+ b)`` for a 2-D ``x`` [M, K] and a group-wise int4 weight as
    ``tileflow.suite.quantize.quantize_int4`` packs it: ``qw`` uint8 [N, K/2], ``scales`` /
    ``zeros`` [N, K/128] in ``x``'s dtype (as ``b``), K a multiple of 256."""
    values = {"x": x, "qw": qw, "scales": scales, "zeros": zeros}
    if b is None:
        return launch("matvec_int4", values, {"HAS_BIAS": 0})[0]
    return launch("matvec_int4", {**values, "b": b}, {"HAS_BIAS": 1})[0]


def matvec_fp8(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' fine-grained FP8 linear of a 2-D ``x`` [M, K]: ``w`` float8_e4m3fn
    [N, K], ``ws`` its fp32 ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] (128 x 128
    blocks), ``x`` quantized per row and 128 columns inside the kernel (+ ``b``, x's dtype)."""
    values = {"x": x, "w": w, "ws": ws}
    if b is None:
        return launch("matvec_fp8", values, {"HAS_BIAS": 0})[0]
    return launch("matvec_fp8", {**values, "b": b}, {"HAS_BIAS": 1})[0]


def _quantized(kind: str, tensors: tuple, suffix: str) -> dict:
    """One quantized weight's named inputs: ``kind`` "int4" (packed codes, scales, zeros) or
    "fp8" (the float8 weight, its fp32 ``weight_scale_inv``), as ``tileflow.suite.quantize`` makes them."""
    if kind not in ("int4", "fp8"):
        raise ValueError(f"tileflow: quantized weights of kind {kind!r} (int4 or fp8)")
    names = ("qw", "scales", "zeros") if kind == "int4" else ("w", "ws")
    return {f"{n}{suffix}": t for n, t in zip(names, tensors, strict=True)}


def rms_norm_gate_up_silu_quant(kind: str, x: torch.Tensor, ln_w: torch.Tensor, eps: float, gate: tuple,
                                up: tuple) -> torch.Tensor:
    """``silu(n @ Wg.T) * (n @ Wu.T)``, ``n = rms_norm(x, ln_w, eps)``, for ``kind`` ("int4" /
    "fp8") weights ``gate`` / ``up`` (each its tensors, as :func:`matvec_int4` / :func:`matvec_fp8`
    take them), one launch."""
    values = {"x": x, "ln_w": ln_w, **_quantized(kind, gate, "_g"), **_quantized(kind, up, "_u"), "eps": eps}
    return launch(f"rms_norm_gate_up_silu_{kind}", values)[0]


def matvec_residual_quant(kind: str, x: torch.Tensor, w: tuple, r: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + r`` for a ``kind`` ("int4" / "fp8") weight ``w`` (its tensors), one launch."""
    return launch(f"matvec_residual_{kind}", {"x": x, **_quantized(kind, w, ""), "r": r})[0]


def rms_norm_qkv_rope_cache_quant(kind: str, x: torch.Tensor, ln_w: torch.Tensor, eps: float, q: tuple, k: tuple,
                                  v: tuple, bq: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                                  bv: Optional[torch.Tensor], pos: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, cfg: RopeConfig,
                                  cache_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`qkv_rope_cache` over ``kind`` ("int4" / "fp8") weights ``q`` / ``k`` / ``v`` (each its
    tensors), one launch: RMSNorm, the projections (+ biases), RoPE at ``pos`` [M], K and V
    written into the caches [B, NKV, S, DH] at ``pos`` (or ``cache_pos`` [M]); returns q [M,
    NH, DH]. M = B (one token a sequence) or B * R (R consecutive tokens of each)."""
    values = {"x": x, "ln_w": ln_w, **_quantized(kind, q, "_q"), **_quantized(kind, k, "_k"),
              **_quantized(kind, v, "_v"), "pos": pos, "k_cache": k_cache, "v_cache": v_cache, "eps": eps,
              **cfg.named}
    # q [M, NH, DH] is allocated here: its head count is the only size no input has
    sizes = {"NH": q[0].shape[0] // k_cache.shape[3], "HAS_BIAS": int(bq is not None), "ROPE_KIND": cfg.kind}
    if bq is not None:
        values.update(b_q=bq, b_k=bk, b_v=bv)
    _cache_rows(x, k_cache, cache_pos, values, sizes)
    return launch(f"rms_norm_qkv_rope_cache_{kind}", values, sizes)[0]


def residual_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` of two 2-D hidden states (fp32 sum, rounded once)."""
    return launch("residual_add", {"a": a, "b": b})[0]


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` of 2-D gate and up projections."""
    return launch("silu_mul", {"a": a, "b": b})[0]
