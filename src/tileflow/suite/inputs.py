"""Input draws that are not plain N(0, 1), shared by the suite's kernels."""

import math

import torch


def linear_weight(gen: torch.Generator, shape, sizes) -> torch.Tensor:
    """An ``nn.Linear`` weight scaled by 1/sqrt(fan_in), so outputs stay O(1)."""
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def token_ids(vocab_key: str):
    def draw(gen, shape, sizes):
        return torch.randint(0, sizes[vocab_key], shape, generator=gen, dtype=torch.int64)
    return draw


def positions(max_key: str):
    """Positions in [0, sizes[max_key])."""
    def draw(gen, shape, sizes):
        return torch.randint(0, sizes[max_key], shape, generator=gen, dtype=torch.int64)
    return draw


def rope_frequencies(gen, shape, sizes):
    """Inverse frequencies like a rotary embedding's (theta drawn in [1e3, 1e6]),
    so table-driven RoPE is checked on realistic angles."""
    theta = 10 ** (3 + 3 * torch.rand((), generator=gen).item())
    return theta ** (-torch.arange(shape[0], dtype=torch.float32) / shape[0])
