"""Verification of the fused decode kernel `rms_norm_mlp_residual` (Triton and the
reference; its atomics have no Pallas form) on every dtype."""

from tests.suite.harness import make_test

test_rms_norm_mlp_residual = make_test("rms_norm_mlp_residual")


def test_any_layout_of_the_down_weight_and_the_sums_back_at_zero(monkeypatch):
    """``ops.rms_norm_mlp_residual`` under the interpreter: the down weight as stored
    (row-major) and re-laid-out column-major in place give the same rows, launch after
    launch on one shared accumulator, which every launch leaves at zero."""
    import torch

    from tileflow.runtime import ops

    monkeypatch.setenv("TILEFLOW_CPU_TARGET", "triton")
    ops._LAUNCHERS.clear()
    gen = torch.Generator().manual_seed(3)
    d, inter = 48, 80
    x, ln_w = torch.randn(1, d, generator=gen), torch.randn(d, generator=gen)
    wg, wu = torch.randn(inter, d, generator=gen) / d ** 0.5, torch.randn(inter, d, generator=gen) / d ** 0.5
    wd = torch.randn(d, inter, generator=gen) / inter ** 0.5
    n = x * torch.rsqrt(x.pow(2).mean() + 1e-6) * ln_w
    want = x + (torch.nn.functional.silu(n @ wg.T) * (n @ wu.T)) @ wd.T
    row_major = ops.rms_norm_mlp_residual(x, ln_w, 1e-6, wg, wu, wd)
    w = torch.nn.Parameter(wd.clone())
    ops.column_major_(w)
    assert w.t().is_contiguous() and torch.equal(w, wd)
    column_major = ops.rms_norm_mlp_residual(x, ln_w, 1e-6, wg, wu, w)
    ops._LAUNCHERS.clear()
    torch.testing.assert_close(row_major, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(column_major, want, rtol=1e-5, atol=1e-5)
    acc, done = ops.mlp_sums(1, d, x.device)
    assert float(acc.abs().sum()) == 0.0 and int(done.abs().sum()) == 0
