"""Suite kernels as torch functions: what the integrations call.

Each function takes torch tensors (Hugging Face layouts) and returns new tensors. On
a GPU it launches the generated Triton kernel with the launch parameters measured
for this device and shape (``tileflow/data/autotune.json`` or the user cache), else
the definition's defaults. On CPU it runs the kernel's reference with fp32
arithmetic, or, with the option ``cpu_target="triton"`` (``TILEFLOW_CPU_TARGET``), the
generated Triton code under the interpreter (how the tests check the integrations
against the real kernels).

Dispatch is one dict lookup per call: per (kernel, sizes, dtype, device) the chosen
parameters, the IR and the launcher are built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tileflow import settings
from tileflow.suite import KERNELS
from tileflow.suite.rope import ROPE_SCALARS

_LAUNCHERS: dict[tuple, Callable] = {}


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


def _matvec_residual(name: str, x, w, r, early: bool = False) -> torch.Tensor:
    n, k = w.shape
    out = _out((x.shape[0], n), x)
    sizes = _early({"M": x.shape[0], "N": n, "K": k}, early)
    _launcher(name, sizes, x.dtype, x.device)(x, w, r, out)
    return out


def o_proj_residual(x, w, r, early: bool = False) -> torch.Tensor:
    """``x @ w.T + r``: attention output projection with the residual (``early``: the
    caller vouches that ``r`` is not the previous kernel's output, see ``_early``)."""
    return _matvec_residual("o_proj_residual", x, w, r, early)


def down_proj_residual(x, w, r, early: bool = False) -> torch.Tensor:
    """``x @ w.T + r``: MLP down projection with the residual."""
    return _matvec_residual("down_proj_residual", x, w, r, early)


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
                     key_mask: Optional[torch.Tensor] = None, early: bool = False) -> torch.Tensor:
    """GQA decode attention of ``q`` [B, NH, DH] over the first ``lengths[b]``
    positions of the caches [B, NKV, S, DH]; with ``key_mask`` [B, S] (int32), only
    over the positions where it is nonzero. ``early``: the caller vouches that
    ``lengths`` is not the previous kernel's output (``_early``)."""
    b, nh, dh = q.shape
    nkv, s = k_cache.shape[1], k_cache.shape[2]
    # launch parameters depend on the capacity only through SPLITS: bucket it to a power
    # of two so a growing (dynamic) cache does not build a launcher per length
    sizes = {"B": b, "NH": nh, "NKV": nkv, "DH": dh, "S": 1 << max(0, (s - 1).bit_length())}
    if key_mask is not None:
        sizes["HAS_MASK"] = 1
    masks = (key_mask,) if key_mask is not None else ()
    out = _out(q.shape, q)
    _launcher("attention_decode_gqa", _early(sizes, early), q.dtype, q.device)(
        q, k_cache, v_cache, lengths, *masks, out, scale)
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
                          wu: torch.Tensor) -> torch.Tensor:
    """``silu(n @ wg.T) * (n @ wu.T)`` with ``n = rms_norm(x, ln_w, eps)``, one launch."""
    n, k = wg.shape
    out = _out((x.shape[0], n), x)
    _launcher("rms_norm_gate_up_silu", {"M": x.shape[0], "N": n, "K": k}, x.dtype, x.device)(
        x, ln_w, wg, wu, out, eps)
    return out


def qkv_rope_cache(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
                   wv: torch.Tensor, bq: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                   bv: Optional[torch.Tensor], pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cfg: Optional[RopeConfig] = None, cache_pos: Optional[torch.Tensor] = None,
                   inv_freq: Optional[torch.Tensor] = None, early: bool = False) -> torch.Tensor:
    """The attention input of a decode layer in one launch: RMSNorm of ``x`` [M, D], the
    q/k/v projections (+ biases), RoPE at ``pos`` [M]; K and V are written into row
    ``pos`` of the caches [M, NKV, S, DH] in place; returns q [M, NH, DH].

    The rotation's frequencies come from ``cfg`` or, as a compiled transformers graph
    has them, from ``inv_freq`` [DH/2] (fp32); ``cache_pos`` [M], when given, is the row
    K and V go to (the graph writes at the cache's own count, rotates at ``pos``).
    ``early``: the caller vouches that the positions are not the previous kernel's output."""
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
    fn = _launcher("qkv_rope_cache", _early(sizes, early), x.dtype, x.device)
    biases = (bq, bk, bv) if bq is not None else ()
    fn(x, ln_w, wq, wk, wv, *biases, pos, *extra, q, k_cache, v_cache, eps,
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
