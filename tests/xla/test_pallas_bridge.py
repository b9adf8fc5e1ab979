"""The Pallas paths' kernel wrappers, on a CPU host.

Exercised here: the generated Pallas kernel of each rewritten op (matvec,
matvec_residual, gate_up_silu) run on XLA tensors under the Pallas interpreter
(``call_jax``) against the float64 reference; its lowering for TPU (Mosaic), which
must be the single ``tpu_custom_call`` on the launch's own arguments that
``make_kernel_from_pallas`` assumes, and the check refusing launches that are not;
the ``make_kernel_from_pallas`` wrapper building its ``tpu_custom_call`` into the XLA
graph from that payload; the rewrite choosing the TPU path for every decode match.
Not exercised (no TPU here): Mosaic compiling the kernels and the TPU running them,
and ``trace_pallas`` lowering on a TPU backend (here the payload it would compute is
computed by lowering for TPU explicitly, then handed to its cache).
"""

import copy

import jax
import pytest
import torch
import torch_xla
from torch_xla.experimental import custom_kernel

from tileflow.integrations.torch.xla import pallas_bridge
from tileflow.integrations.torch.xla.kernels import CALLS
from tileflow.integrations.torch.xla.report import XlaReport
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.runtime.jax_pallas import pallas_launcher
from tileflow.suite import KERNELS

BOUNDS = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
# (op, shapes of its tensor arguments): the tiny models' decode shapes, odd sizes, a
# Qwen-1.5B shape (lowered only: the interpreter would take minutes there)
TINY = [
    ("matvec", ((1, 64), (64, 64), (64,))),
    ("matvec", ((1, 64), (128, 64), None)),
    ("matvec", ((1, 50), (37, 50), (37,))),
    ("matvec_residual", ((1, 96), (64, 96), (1, 64))),
    ("matvec_residual", ((1, 45), (29, 45), (1, 29))),
    ("gate_up_silu", ((1, 64), (96, 64), (96, 64))),
]
LARGE = [("gate_up_silu", ((1, 1536), (8960, 1536), (8960, 1536))),
         ("matvec", ((1, 1536), (151936, 1536), None))]


def _inputs(shapes, dtype, device):
    g = torch.Generator().manual_seed(0)
    return [None if s is None else torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


def _meta(shapes, dtype):
    return [None if s is None else torch.empty(s, dtype=dtype, device="meta") for s in shapes]


def _reference64(op, tensors):
    import array_api_compat

    call = CALLS[op]
    inputs = {n: t.double() for n, t in zip(call.inputs, tensors) if t is not None}
    return KERNELS[call.kernel].run_reference(array_api_compat.array_namespace(*inputs.values()), **inputs)["out"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,shapes", TINY, ids=[f"{o}-{s[1][0]}x{s[1][1]}" for o, s in TINY])
def test_interpreted_kernel_on_xla_tensors_matches_reference(op, shapes, dtype):
    cpu = _inputs(shapes, dtype, "cpu")
    xla = [None if t is None else t.to(torch_xla.device()) for t in cpu]
    got = pallas_bridge.INTERPRET_OPS[op](*xla).cpu()
    want = _reference64(op, cpu)
    assert got.shape == want.shape and got.dtype == dtype and not got.isnan().any()
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= BOUNDS[dtype], err


@pytest.mark.parametrize("op,shapes", TINY + LARGE, ids=[f"{o}-{s[1][0]}x{s[1][1]}" for o, s in TINY + LARGE])
def test_tpu_lowering_is_one_mosaic_call_on_the_arguments(op, shapes):
    k = pallas_bridge.kernel_for(op, *_meta(shapes, torch.bfloat16))
    assert k.tpu_problem() == ""
    assert k.params["SPLIT_K"] == 1 and k.sizes["N"] % k.params["BLOCK_N"] == 0
    payload = k.tpu_payload()  # torch-xla's own extraction, as trace_pallas does it
    assert payload and "custom_call_config" in payload


def test_tpu_check_refuses_split_k_and_padded_launches():
    def problem(sizes, **overrides):
        kernel = KERNELS["matvec_residual"]
        ir = kernel.build({**kernel.default_params(sizes), **overrides})
        fn = lambda *a: pallas_launcher(ir)(*a, interpret=False)  # noqa: E731
        m, n, k_ = sizes["M"], sizes["N"], sizes["K"]
        shapes = [jax.ShapeDtypeStruct(s, jax.numpy.float32) for s in ((m, k_), (n, k_), (m, n), (m, n))]
        return pallas_bridge.single_call_problem(
            jax.jit(fn).trace(*shapes).lower(lowering_platforms=("tpu",)).compiler_ir())

    sizes = dict(M=1, N=64, K=96)
    assert problem(sizes, BLOCK_K=32) == ""
    assert "not one kernel call" in problem(sizes, SPLIT_K=2, BLOCK_K=32)  # two stages
    assert problem(sizes, BLOCK_K=64) != ""  # K padded to 128 first: pads before the call


def test_make_kernel_from_pallas_wrapper_builds_the_tpu_custom_call():
    dev = torch_xla.device()
    x, w, b = _inputs(((1, 64), (64, 64), (64,)), torch.float32, dev)
    k = pallas_bridge.kernel_for("matvec", x, w, b)
    # seed trace_pallas' cache with the payload it would extract on a TPU host (keyed
    # as it keys it), so that the wrapper runs here up to building the custom call
    key = (jax.config.jax_default_matmul_precision, k.compiled_fn, None, None,
           tuple(k.shapes()), repr([]).encode())
    custom_kernel.trace_pallas_arg_to_payload[key] = k.tpu_payload()
    try:
        out = pallas_bridge.TPU_OPS["matvec"](x, w, b)
    finally:
        del custom_kernel.trace_pallas_arg_to_payload[key]
    assert tuple(out.shape) == (1, 64) and out.dtype == torch.float32
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([out])
    assert 'custom_call_target="tpu_custom_call"' in hlo and k.tpu_payload()[-200:] in hlo


def test_rewrite_takes_the_tpu_path_for_every_decode_match(monkeypatch):
    from torch._dynamo.backends.common import aot_autograd

    from tests.integrations.test_transformers_patch import prompt, tiny
    from tileflow.integrations.torch.xla.rewrite import rewrite_for_xla
    from transformers import StaticCache

    dev = torch_xla.device()
    model, ids = tiny("qwen2"), prompt()
    model, ids = model.to(dev), ids.to(dev)
    cache = StaticCache(config=model.config, max_cache_len=32)
    report = XlaReport(client="TPU")
    graphs = []

    def capture(gm, inputs):  # the ATen graph the XLA backend rewrites, rewritten for TPU
        tpu = copy.deepcopy(gm)  # and the original runs: the TPU kernels cannot here
        rewrite_for_xla(tpu.graph, report, "pallas")
        graphs.append(tpu.graph)
        return gm

    torch._dynamo.reset()
    kw = cache_keyword(model)  # cache= on transformers 5.24+, past_key_values= before
    with torch.no_grad():
        model(ids, **{kw: cache}, use_cache=True)
        torch.compile(model.forward, backend=aot_autograd(fw_compiler=capture))(
            input_ids=ids[:, :1], position_ids=torch.tensor([[9]], device=dev), **{kw: cache}, use_cache=True)
    torch._dynamo.reset()
    assert dict(report.paths) == {("gate_up_silu", "pallas"): 2, ("matvec_residual", "pallas"): 4,
                                  ("matvec", "pallas"): 7}
    assert not report.fallbacks
    targets = {n.target for g in graphs for n in g.nodes if n.op == "call_function"}
    assert set(pallas_bridge.TPU_OPS.values()) <= targets
