"""Suite kernels as torch functions: what the integrations call.

Each function takes torch tensors (Hugging Face layouts) and returns new tensors. On
a GPU it launches the generated Triton kernel with the launch parameters measured
for this device and shape (``tileflow/data/autotune.json`` or the user cache), else
the definition's defaults. On CPU it runs the kernel's reference with fp32
arithmetic, or, with ``TILEFLOW_CPU_TARGET=triton``, the generated Triton code under
the interpreter (how the tests check the integrations against the real kernels).

Dispatch is one dict lookup per call: per (kernel, sizes, dtype, device) the chosen
parameters, the IR and the launcher are built once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from tileflow.suite import KERNELS
from tileflow.suite.ahead import ahead_sizes
from tileflow.suite.rope import ROPE_SCALARS

_LAUNCHERS: dict[tuple, Callable] = {}


def cpu_target() -> str:
    """"reference" (default) or "triton" (the interpreter) for CPU tensors."""
    return os.environ.get("TILEFLOW_CPU_TARGET", "reference")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tuned_params(name: str, sizes: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The definition's defaults, then the measured parameters for this device and shape
    (``emit.autotune.lookup``), then the structural sizes."""
    from tileflow.emit import autotune

    kernel = KERNELS[name]
    tuned = autotune.lookup(name, sizes, DTYPE_NAMES[dtype], _device_name(device)) or {}
    return {**kernel.default_params(sizes), **tuned, **kernel.structural_sizes(sizes)}


def launch_params(name: str, sizes: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The parameters a launch of suite kernel ``name`` at ``sizes`` uses on ``device``:
    :func:`tuned_params` (the reference path on CPU takes the defaults)."""
    if device.type == "cpu" and cpu_target() == "reference":
        return KERNELS[name].default_params(sizes)
    return tuned_params(name, sizes, dtype, device)


def _launcher(name: str, sizes: dict, dtype: torch.dtype, device: torch.device) -> Callable:
    key = (name, tuple(sorted(sizes.items())), dtype, device.type, device.index)
    fn = _LAUNCHERS.get(key)
    if fn is not None:
        return fn
    kernel = KERNELS[name]
    if device.type == "cpu" and cpu_target() == "reference":
        fn = _reference_launcher(kernel, sizes)
    else:
        from tileflow.runtime.torch_triton import torch_launcher

        ir = kernel.build(launch_params(name, sizes, dtype, device))
        fn = torch_launcher(ir, device.type, sizes)
    _LAUNCHERS[key] = fn
    return fn


def _reference_launcher(kernel, sizes: dict) -> Callable:
    """The reference with fp32 arithmetic, writing into the given outputs (and
    in-place views): a drop-in for the generated ``launch`` of the same sizes."""
    import array_api_compat

    ir = kernel.build(kernel.default_params(sizes))
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


def _out(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of a 2-D ``x`` with gamma ``w``."""
    out = _out(x.shape, x)
    _launcher("rms_norm", {"M": x.shape[0], "D": x.shape[1]}, x.dtype, x.device)(x, w, out, eps)
    return out


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for a 2-D ``x`` (decode: one row)."""
    n, k = w.shape
    out = _out((x.shape[0], n), x)
    sizes = {"M": x.shape[0], "N": n, "K": k, "HAS_BIAS": int(b is not None)}
    fn = _launcher("q_proj_matvec", sizes, x.dtype, x.device)
    fn(x, w, b, out) if b is not None else fn(x, w, out)
    return out


def kv_proj(x, wk, wv, bk=None, bv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ``x @ wk.T + bk`` and ``x @ wv.T + bv`` in one launch."""
    n, k = wk.shape
    ko, vo = _out((x.shape[0], n), x), _out((x.shape[0], n), x)
    sizes = {"M": x.shape[0], "N": n, "K": k, "HAS_BIAS": int(bk is not None)}
    fn = _launcher("kv_proj_matvec", sizes, x.dtype, x.device)
    fn(x, wk, wv, bk, bv, ko, vo) if bk is not None else fn(x, wk, wv, ko, vo)
    return ko, vo


def _early(sizes: dict, early: bool) -> dict:
    """``EARLY_INPUTS`` in ``sizes`` when the caller vouches for it: the kernel's inputs
    other than its main activation were written two or more kernels back (never by the
    kernel just before), so they may load before the dependent-launch wait."""
    if early:
        sizes["EARLY_INPUTS"] = 1
    return sizes


def _matvec_residual(name: str, x, w, r, early: bool = False, extra: Optional[dict] = None,
                     ahead: Sequence[torch.Tensor] = (), tail: tuple = ()) -> torch.Tensor:
    """``tail``: the launch's last arguments (ready counters and their chunk)."""
    n, k = w.shape
    out = _out((x.shape[0], n), x)
    sizes = _early({"M": x.shape[0], "N": n, "K": k, **(extra or {})}, early)
    _launcher(name, sizes, x.dtype, x.device)(x, w, r, out, *ahead, *tail)
    return out


def o_proj_residual(x, w, r, early: bool = False, ahead: Sequence[torch.Tensor] = (),
                    keep: bool = False) -> torch.Tensor:
    """``x @ w.T + r``: attention output projection with the residual (``early``: the
    caller vouches that ``r`` is not the previous kernel's output, see ``_early``;
    ``ahead``, ``keep``: tensors to bring into L2 for later kernels, see ``suite.ahead.ahead_sizes``)."""
    flat, extra = ahead_sizes(ahead, keep)
    return _matvec_residual("o_proj_residual", x, w, r, early, extra, flat)


@dataclass(frozen=True)
class ReadyLink:
    """Ready counters between a producer launch and the consumer right after it
    (``suite.ready``): ``counters`` [NC] (int32) count the producer's stored rows per
    ``chunk`` rows; the producer clears ``next_counters`` (the next pair's) for the caller."""

    counters: torch.Tensor
    next_counters: torch.Tensor
    chunk: int


def down_proj_residual(x, w, r, ahead: Sequence[torch.Tensor] = (), keep: bool = False,
                       early: bool = False, ready: Optional[ReadyLink] = None) -> torch.Tensor:
    """``x @ w.T + r``: MLP down projection with the residual. ``ahead`` (e.g. the next
    layer's attention weights) and ``keep``: as for :func:`o_proj_residual`. ``ready``: the
    launch just before (:func:`rms_norm_gate_up_silu` with the same link) wrote ``x`` and
    counts it in chunks; each K round waits only for its chunks (``r`` must then be older)."""
    flat, extra = ahead_sizes(ahead, keep)
    if ready is None:
        return _matvec_residual("down_proj_residual", x, w, r, early, extra, flat)
    extra.update(READY_WAIT=1, NC=ready.counters.shape[0])
    return _matvec_residual("down_proj_residual", x, w, r, early, extra, flat, (ready.counters, ready.chunk))


def gate_up_silu(x, wg, wu) -> torch.Tensor:
    """``silu(x @ wg.T) * (x @ wu.T)``."""
    n, k = wg.shape
    out = _out((x.shape[0], n), x)
    _launcher("mlp_gate_up_silu", {"M": x.shape[0], "N": n, "K": k}, x.dtype, x.device)(x, wg, wu, out)
    return out


@dataclass(frozen=True)
class RopeConfig:
    """RoPE constants read off a transformers config: kind (0 default, 1 linear,
    2 llama3) and the runtime scalars of that kind, in kernel order."""

    kind: int
    scalars: tuple


def rope(x: torch.Tensor, pos: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotary embedding of ``x`` [M, H, DH] at positions ``pos`` [M] (int64)."""
    m, h, dh = x.shape
    out = _out(x.shape, x)
    sizes = {"M": m, "NH": h, "DH": dh, "ROPE_KIND": cfg.kind}
    _launcher("rope_q", sizes, x.dtype, x.device)(x, pos, out, *cfg.scalars)
    return out


def attention_decode(q, k_cache, v_cache, lengths, scale: float,
                     key_mask: Optional[torch.Tensor] = None, early: bool = False,
                     ahead: Sequence[torch.Tensor] = (), keep: bool = False) -> torch.Tensor:
    """GQA decode attention of ``q`` [B, NH, DH] over the first ``lengths[b]``
    positions of the caches [B, NKV, S, DH]; with ``key_mask`` [B, S] (int32), only
    over the positions where it is nonzero. ``early``: the caller vouches that
    ``lengths`` is not the previous kernel's output (``_early``); ``ahead``, ``keep``:
    tensors to bring into L2 for later kernels (``suite.ahead.ahead_sizes``)."""
    out = _out(q.shape, q)
    sizes, masks, flat = _attention_launch(q, k_cache, key_mask, early, ahead, keep)
    _launcher("attention_decode_gqa", sizes, q.dtype, q.device)(q, k_cache, v_cache, lengths, *masks, out,
                                                                *flat, scale)
    return out


def _attention_launch(q, k_cache, key_mask, early: bool, ahead: Sequence[torch.Tensor], keep: bool,
                      **extra) -> tuple[dict, tuple, list]:
    """The sizes, the mask argument and the look-ahead views of a launch whose first stage
    is attention's (``attention_decode_gqa`` and the kernels fusing it); ``extra``: more sizes."""
    b, nh, dh = q.shape
    nkv, s = k_cache.shape[1], k_cache.shape[2]
    # launch parameters depend on the capacity only through SPLITS: bucket it to a power
    # of two so a growing (dynamic) cache does not build a launcher per length
    sizes = {"B": b, "NH": nh, "NKV": nkv, "DH": dh, "S": 1 << max(0, (s - 1).bit_length()), **extra}
    if key_mask is not None:
        sizes["HAS_MASK"] = 1
    flat, ahead_extra = ahead_sizes(ahead, keep)
    masks = (key_mask,) if key_mask is not None else ()
    return _early({**sizes, **ahead_extra}, early), masks, flat


def attention_o_proj_residual(q, k_cache, v_cache, lengths, wo, r, scale: float,
                              key_mask: Optional[torch.Tensor] = None, early: bool = False,
                              ahead: Sequence[torch.Tensor] = (), keep: bool = False) -> torch.Tensor:
    """``attention_decode(q, ...).view(B, -1) @ wo.T + r`` in two launches (the fused
    suite kernel): ``wo`` [N, NH * DH] is o_proj's weight, ``r`` [B, N] the residual.
    ``key_mask``, ``early``, ``ahead``, ``keep``: as for :func:`attention_decode`
    (``early`` vouches for ``r`` too)."""
    b, nh, dh = q.shape
    n = wo.shape[0]
    out = _out((b, n), r)
    sizes, masks, flat = _attention_launch(q, k_cache, key_mask, early, ahead, keep, N=n)
    _launcher("attention_o_proj_residual", sizes, q.dtype, q.device)(
        q, k_cache, v_cache, lengths, *masks, wo.view(n, nh, dh), r, out, *flat, scale)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens of 2-D logits (int64), ties to the lowest index."""
    out = _out((logits.shape[0],), logits, torch.int64)
    _launcher("argmax_greedy", {"M": logits.shape[0], "V": logits.shape[1]}, logits.dtype, logits.device)(
        logits, out)
    return out


def rope_config_of(config) -> tuple[Optional[RopeConfig], str]:
    """The RopeConfig of a transformers config, or (None, why not)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        return None, "config has no rope_theta"
    src = {**scaling, **params}
    if src.get("partial_rotary_factor", 1.0) != 1.0:
        return None, "partial rotary embedding is not supported"
    if rope_type == "default":
        return RopeConfig(0, (float(theta),)), ""
    if rope_type == "linear":
        return RopeConfig(1, (float(theta), float(src["factor"]))), ""
    if rope_type == "llama3":
        vals = (float(theta), float(src["factor"]), float(src["low_freq_factor"]), float(src["high_freq_factor"]),
                float(src["original_max_position_embeddings"]))
        assert len(vals) == len(ROPE_SCALARS[2])
        return RopeConfig(2, vals), ""
    return None, f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)"


def rms_norm_linear(x: torch.Tensor, ln_w: torch.Tensor, eps: float, w: torch.Tensor,
                    b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rms_norm(x, ln_w, eps) @ w.T (+ b)`` in one launch (final norm + lm_head)."""
    n, k = w.shape
    out = _out((x.shape[0], n), x)
    sizes = {"M": x.shape[0], "N": n, "K": k, "HAS_BIAS": int(b is not None)}
    fn = _launcher("rms_norm_matvec", sizes, x.dtype, x.device)
    fn(x, ln_w, w, b, out, eps) if b is not None else fn(x, ln_w, w, out, eps)
    return out


def rms_norm_gate_up_silu(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wg: torch.Tensor,
                          wu: torch.Tensor, ready: Optional[ReadyLink] = None) -> torch.Tensor:
    """``silu(n @ wg.T) * (n @ wu.T)`` with ``n = rms_norm(x, ln_w, eps)``, one launch.
    ``ready``: also count the stored rows per chunk for the consumer launched next
    (:func:`down_proj_residual` with the same link), and clear the next pair's counters."""
    n, k = wg.shape
    out = _out((x.shape[0], n), x)
    sizes = {"M": x.shape[0], "N": n, "K": k}
    if ready is None:
        _launcher("rms_norm_gate_up_silu", sizes, x.dtype, x.device)(x, ln_w, wg, wu, out, eps)
        return out
    sizes.update(READY_SIGNAL=1, NC=ready.counters.shape[0])
    _launcher("rms_norm_gate_up_silu", sizes, x.dtype, x.device)(
        x, ln_w, wg, wu, out, ready.counters, ready.next_counters, eps, ready.chunk)
    return out


_MLP_SUMS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def mlp_sums(m: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 accumulator [m, d] and the int32 count [m] that :func:`rms_norm_mlp_residual`
    sums into: zero, and put back to zero by every launch, so launches on one stream (and
    every layer of a CUDA graph) share them. Allocated on first use: warm up before a
    capture."""
    key = (m, d, device.type, device.index)
    if key not in _MLP_SUMS:
        _MLP_SUMS[key] = (torch.zeros(m, d, dtype=torch.float32, device=device),
                          torch.zeros(m, dtype=torch.int32, device=device))
    return _MLP_SUMS[key]


def rms_norm_mlp_residual(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wg: torch.Tensor, wu: torch.Tensor,
                          wd: torch.Tensor) -> torch.Tensor:
    """``x + down(silu(gate(n)) * up(n))`` with ``n = rms_norm(x, ln_w, eps)``: a layer's whole
    MLP in one launch (``suite.rms_norm_mlp_residual``). ``wd`` is the ``[D, I]`` down weight,
    any strides (stored column-major, :func:`column_major_`, each program's columns are whole rows)."""
    inter, d = wg.shape
    out = _out(x.shape, x)
    acc, done = mlp_sums(x.shape[0], d, x.device)
    sizes = {"M": x.shape[0], "I": inter, "D": d}
    _launcher("rms_norm_mlp_residual", sizes, x.dtype, x.device)(x, ln_w, wg, wu, wd, out, acc, done, eps)
    return out


def column_major_(w: torch.Tensor) -> None:
    """Re-lay ``w`` (a 2-D parameter) out column-major in place: the same values and shape
    to every reader, but its columns are contiguous, so :func:`rms_norm_mlp_residual` reads
    each program's columns of the down weight as whole rows."""
    if w.dim() == 2 and w.stride() != (1, w.shape[0]):
        w.data = w.data.t().contiguous().t()


def ready_chunk(inter: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, str]:
    """The chunk of ``h`` [1, inter] per ready counter between the MLP's gate-up and down
    launches (down's K round, so each round polls one counter), or (0, why not)."""
    up = launch_params("rms_norm_gate_up_silu", {"M": 1, "N": inter, "K": d}, dtype, device)
    down = launch_params("down_proj_residual", {"M": 1, "N": d, "K": inter}, dtype, device)
    if up.get("SPLIT_K", 1) > 1 or down.get("SPLIT_K", 1) > 1:
        return 0, "split-K launches (partials in a second stage) have no ready counters"
    chunk = down["BLOCK_K"]
    if chunk % up["BLOCK_N"]:
        return 0, f"down's K round {chunk} is not a multiple of gate-up's {up['BLOCK_N']} rows a program"
    return chunk, ""


def qkv_rope_cache(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
                   wv: torch.Tensor, bq: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                   bv: Optional[torch.Tensor], pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cfg: Optional[RopeConfig] = None, cache_pos: Optional[torch.Tensor] = None,
                   inv_freq: Optional[torch.Tensor] = None, early: bool = False,
                   ahead: Sequence[torch.Tensor] = (), keep: bool = False) -> torch.Tensor:
    """The attention input of a decode layer in one launch: RMSNorm of ``x`` [M, D], the
    q/k/v projections (+ biases), RoPE at ``pos`` [M]; K and V are written into row
    ``pos`` of the caches [M, NKV, S, DH] in place; returns q [M, NH, DH].

    The rotation's frequencies come from ``cfg`` or, as a compiled transformers graph
    has them, from ``inv_freq`` [DH/2] (fp32); ``cache_pos`` [M], when given, is the row
    K and V go to (the graph writes at the cache's own count, rotates at ``pos``).
    ``early``: the caller vouches that the positions are not the previous kernel's output;
    ``ahead``, ``keep``: tensors to bring into L2 for later kernels (``suite.ahead.ahead_sizes``)."""
    m, nkv, s, dh = k_cache.shape
    nq = wq.shape[0]
    q = _out((m, nq // dh, dh), x)
    sizes = {"M": m, "K": x.shape[1], "NH": nq // dh, "NKV": nkv, "DH": dh, "NQ": nq, "NKD": nkv * dh,
             "S": s, "HAS_BIAS": int(bq is not None), "ROPE_KIND": 3 if inv_freq is not None else cfg.kind}
    extra = []
    if cache_pos is not None:
        sizes["CACHE_POS"] = 1
        extra.append(cache_pos)
    if inv_freq is not None:
        sizes["HALF"] = dh // 2
        extra.append(inv_freq)
    flat, ahead_extra = ahead_sizes(ahead, keep)
    fn = _launcher("qkv_rope_cache", _early({**sizes, **ahead_extra}, early), x.dtype, x.device)
    biases = (bq, bk, bv) if bq is not None else ()
    fn(x, ln_w, wq, wk, wv, *biases, pos, *extra, q, k_cache, v_cache, *flat, eps,
       *(() if inv_freq is not None else cfg.scalars))
    return q


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` for the 1-D int64 ``ids``. An id outside ``[0, V)`` raises
    IndexError on CPU, as the model's embedding does; on a GPU (no host read per token)
    the kernel gives that row as NaN and reads nothing outside the table."""
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"tileflow: token id {bad} is out of range for an embedding of {table.shape[0]} rows")
    out = _out((ids.shape[0], table.shape[1]), table)
    _launcher("embedding_lookup", {"M": ids.shape[0], "V": table.shape[0], "D": table.shape[1]}, table.dtype,
              table.device)(ids, table, out)
    return out


def rope_k_into_cache(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cfg: RopeConfig) -> None:
    """Rotate ``k`` [M, NKV, DH] at ``pos`` and write it, and ``v``, into row ``pos`` of
    the static caches [M, NKV, S, DH], in place."""
    m, h, dh = k.shape
    sizes = {"M": m, "NKV": h, "DH": dh, "ROPE_KIND": cfg.kind}
    _launcher("rope_k", sizes, k.dtype, k.device)(k, pos, v, k_cache, v_cache, *cfg.scalars)
