"""Weight quantizers for the low-precision matvecs (``matvec_int4``, ``matvec_fp8``), in
plain torch: a bf16 / fp32 ``nn.Linear`` weight ``[N, K]`` in, the packed weight and its
scales out, as the kernels read them. Used by the tests and by ``tileflow.patch(model,
weights=...)``; the dequantizers are what the kernels' references compute.

int4 (gpt-fast's ``WeightOnlyInt4Linear`` / torchao's ``int4_weight_only`` math: asymmetric,
a scale and a zero point per (row, 128 columns) group, zero point in the float domain)::

    scale = max(max(w_g) - min(w_g), 1e-6) / 15          (rounded to the scales' dtype)
    zero  = min(w_g) + 8 * scale                          (rounded likewise)
    q     = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)
    w    ~= (q - 8) * scale + zero

Packing (this project's, chosen so a kernel reads both nibbles of a byte against two
contiguous slices of x, with no interleave): ``packed[n, j] = q[n, j] | q[n, j + K/2] << 4``
for ``j < K/2``; K must be a multiple of 256 (each half a whole number of groups).

fp8 (transformers' fine-grained FP8, ``weight_block_size`` [128, 128], ``scale_fmt``
"float"): per 128 x 128 block ``scale_inv = amax / 448`` (1 for an all-zero block), ``w_q =
fp8_e4m3(clamp(w * (448 / amax), -448, 448))``, ``w ~= w_q * scale_inv``.
"""

from __future__ import annotations

import torch

GROUP = 128  # int4 group along K, and the fp8 block edge along N and K
FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_int4(w: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """``w`` [N, K] -> (packed uint8 [N, K/2], scales [N, K/128], zeros [N, K/128]); scales
    and zeros in ``scale_dtype`` (default: ``w``'s dtype), the activations' dtype at run time."""
    n, k = w.shape
    if k % (2 * GROUP):
        raise ValueError(f"quantize_int4: K={k} must be a multiple of {2 * GROUP}")
    dtype = scale_dtype or w.dtype
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    zeros = (lo + scales.float() * 8).to(dtype)
    # quantize against the rounded parameters, as gpt-fast does: dequant then uses the same
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = ((g - (z - 8 * s)) / s).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, : k // 2] | (q[:, k // 2:] << 4)
    return packed.contiguous(), scales.contiguous(), zeros.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes [N, K] (0..15, int32) of a packed [N, K/2] weight."""
    p = packed.to(torch.int32)
    return torch.cat([p & 15, p >> 4], dim=1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp32 ``(q - 8) * scale + zero`` [N, K]."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    s = scales.float().repeat_interleave(GROUP, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(GROUP, dim=1)[:, :k]
    return (q - 8) * s + z


def quantize_fp8(w: torch.Tensor):
    """``w`` [N, K] -> (float8_e4m3fn [N, K], fp32 weight_scale_inv [ceil(N/128), ceil(K/128)]),
    transformers' ``Fp8Quantize`` with 128 x 128 blocks (ragged edge blocks padded with zeros,
    which leave each block's amax unchanged)."""
    n, k = w.shape
    nb, kb = -(-n // GROUP), -(-k // GROUP)
    padded = torch.zeros(nb * GROUP, kb * GROUP, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.reshape(nb, GROUP, kb, GROUP)
    amax = blocks.abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    scale_inv = (1.0 / scales).to(torch.float32)
    q = (blocks * scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(nb * GROUP, kb * GROUP)[:n, :k].contiguous(), scale_inv


def dequantize_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp32 ``w_q * scale_inv`` of its block, [N, K]."""
    n, k = w_fp8.shape
    s = scale_inv.float().repeat_interleave(GROUP, dim=0).repeat_interleave(GROUP, dim=1)[:n, :k]
    return w_fp8.float() * s


def fp8_linear_torch(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ``FP8Linear`` forward on CUDA (dynamic activations, 128 x 128 blocks) as the
    Hub's finegrained-fp8 Triton ``matmul_2d`` computes it, re-written in torch (there is no CPU
    path to call): per token and 128 columns ``a_s = amax / 448``, ``xq = fp8(x / max(a_s,
    1e-12))``; per group an fp32 dot times ``a_s`` times the block's ``scale_inv``, added over
    the groups in order; the sum rounded to x's dtype; the bias added after, in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n, groups = w_fp8.shape[0], -(-k // GROUP)
    pad = groups * GROUP - k
    xg = torch.nn.functional.pad(x2.float(), (0, pad)).reshape(-1, groups, GROUP)
    a_s = xg.abs().amax(dim=-1) / FP8_MAX
    xq = (xg / a_s.clamp(min=1e-12)[..., None]).to(torch.float8_e4m3fn).float()
    wq = torch.nn.functional.pad(w_fp8.float(), (0, pad)).reshape(n, groups, GROUP)
    w_s = scale_inv.float().repeat_interleave(GROUP, dim=0)[:n]  # [N, groups]
    acc = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x.device)
    for g in range(groups):
        acc += (xq[:, g] @ wq[:, g].T) * a_s[:, g, None] * w_s[None, :, g]
    out = acc.to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead, n)
