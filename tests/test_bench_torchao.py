"""torchao's weight-only paths of ``tileflow bench --weights`` (``bench/torchao_paths.py``): where
they are in the path list and where not (and why), the one line a missing torchao gives, and a
CPU run of the int8 path on a tiny model: its measured error, its own roofline, the model's
weights and process-wide settings given back. torchao is not in the ``dev`` extra: where it is
installed, transformers imports it on every import (its extension-load and pytree lines on
stderr of every example and bench run), so the two tests that run it skip where it is absent
(``pip install torchao`` runs them); the int4 path (tinygemm) also needs CUDA."""

import json
import sys

import pytest
import torch

from tileflow.bench import decode, run_bench
from tileflow.bench import torchao_paths as tao
from tileflow.bench.decode import Path, _eager_step, default_paths, forced_reference, paths_not_here, run_path
from tileflow.bench.models import build_model

TORCHAO = ["torchao_int8", "torchao_int4"]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_the_torchao_paths_come_last_with_weights_on_cuda_only():
    plain = [p.name for p in default_paths(CUDA)]
    assert not set(TORCHAO) & set(plain)
    for weights in ("int4", "fp8"):
        names = [p.name for p in default_paths(CUDA, weights)]
        assert names == plain + TORCHAO  # last: nothing timed after them depends on their set-up
        paths = {p.name: p for p in default_paths(CUDA, weights)}
        assert paths["torchao_int8"].weights == "int8" and paths["torchao_int4"].weights == "int4"
        assert all(paths[n].cache == "static" and paths[n].forced_on_step for n in TORCHAO)
        assert not set(TORCHAO) & {p.name for p in default_paths(CPU, weights)}
    # why not, where they are left out
    assert "--weights" in paths_not_here(CUDA, "model")["torchao_int4"]
    here = paths_not_here(CPU, "int4")
    assert set(here) == {"inductor_cudagraphs", *TORCHAO} and "CUDA only" in here["torchao_int8"]
    assert set(paths_not_here(CUDA, "int4")) == set()


def test_the_cli_takes_the_torchao_paths_by_name():
    from tileflow.cli import build_parser

    args = build_parser().parse_args(["bench", "--weights", "int4", "--paths", "tileflow_patch", *TORCHAO])
    assert args.paths == ["tileflow_patch", *TORCHAO]


def test_without_torchao_the_path_is_not_run_with_one_line(monkeypatch, tmp_path, capsys):
    """torchao missing: the path is recorded as not run, with the reason in one line (no error,
    no traceback, exit 0: the rest of the run stands), the model untouched. On CPU through the
    bench by putting the path in the CPU list (on CUDA it is there by default)."""
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    model = build_model("tiny", CPU, torch.float32, layers=1)
    why = tao.unavailable("int8", model)
    assert why.startswith("torchao is not importable (ModuleNotFoundError") and "\n" not in why, why
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    before = {n: p for n, p in model.named_parameters()}
    res, logits = run_path(decode.torchao_path("torchao_int8"), model, ids, 3, 1, None, None)
    assert res.not_run == why and not res.error and logits == [] and res.decode_tok_s != res.decode_tok_s
    assert all(p is before[n] for n, p in model.named_parameters())

    from tileflow.cli import main

    real = decode.default_paths
    monkeypatch.setattr("tileflow.bench.default_paths",
                        lambda dev, weights="model": real(dev, weights) + [decode.torchao_path(n) for n in TORCHAO])
    monkeypatch.setattr("tileflow.bench.paths_not_here", lambda dev, weights="model": {})
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny", "--weights", "int4", "--new", "3", "--prompt", "4", "--layers", "1",
                 "--paths", *TORCHAO, "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "torchao_int8: not run: torchao is not importable" in printed and "Traceback" not in printed
    (written,) = out.glob("*.json")
    rec = json.loads(written.read_text())
    for name in TORCHAO:
        assert rec["paths"][name]["not_run"].startswith("torchao is not importable") and not rec["paths"][name]["error"]
    assert "not_run" not in rec["paths"]["eager"]


def test_on_cpu_the_bench_says_why_the_torchao_paths_are_not_shown(tmp_path, capsys):
    rec = run_bench("tiny", prompt=4, new_tokens=2, paths=["torchao_int4"], repeats=1, out_dir=str(tmp_path),
                    device="cpu", weights="int4", layers=1)
    assert set(rec["paths"]) == {"eager"}
    assert set(rec["not_shown"]) == {"torchao_int4"} and "CUDA only" in rec["not_shown"]["torchao_int4"]
    assert "warning: torchao_int4 not run: the torchao paths run on CUDA only" in capsys.readouterr().err


NEEDS_TORCHAO = pytest.mark.skipif(tao.unavailable("int8", None) != "",
                                   reason="torchao not installed (the comparison's own dependency: pip install torchao)")


@NEEDS_TORCHAO
def test_torchao_int4_asks_for_cuda_and_bf16():
    model = build_model("tiny", CPU, torch.bfloat16, layers=1)
    assert tao.unavailable("int8", model) == ""
    assert "CUDA only" in tao.unavailable("int4", model)


@NEEDS_TORCHAO
def test_torchao_int8_on_cpu_records_its_error_and_gives_the_weights_back(monkeypatch, tmp_path):
    """The int8 path run on CPU (reduce-overhead there is inductor without CUDA graphs) through
    the bench, as on CUDA: the projections' measured error (the patch report's measure), the
    logits teacher-forced on eager's tokens, a roofline of its own bytes (int8 codes, a scale
    and zero point a row), then the same Parameter objects back, bit-exact, and torchao's
    inductor settings undone."""
    real, built = decode.default_paths, []
    monkeypatch.setattr("tileflow.bench.default_paths",
                        lambda dev, weights="model": real(dev, weights) + [decode.torchao_path("torchao_int8")])
    monkeypatch.setattr("tileflow.bench.paths_not_here", lambda dev, weights="model": {})

    def build(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        built.append({n: (p, p.detach().clone()) for n, p in built[0].named_parameters()})
        return built[0]

    monkeypatch.setattr("tileflow.bench.build_model", build)
    inductor, precision = torch._inductor.config.save_config(), torch.get_float32_matmul_precision()
    rec = run_bench("tiny", prompt=8, new_tokens=6, paths=["torchao_int8"], repeats=1, out_dir=str(tmp_path),
                    device="cpu", weights="fp8", layers=2)
    ours = rec["paths"]["torchao_int8"]
    assert not ours["error"] and ours["weights"] == "int8", ours
    assert set(ours["quantization_error_per_layer"]) == {"model.layers.0", "model.layers.1"}
    assert 0 < ours["quantization_error_max"] < 0.02  # int8 per row: ~1e-2 of the output's max at most
    assert ours["forced_steps"] == 6 and 0.5 <= ours["forced_top1_agreement"] <= 1
    assert 0 < ours["forced_max_rel_logit_err"] < 0.05 and ours["forced_max_abs_logit_err"] > 0
    # its bytes by hand: fp32 tiny (D 256, inter 704, 2 KV heads of 32), N * K int8 codes plus an
    # fp32 scale and an int8 zero point a row, against N * K * 4
    shapes = [(256, 256), (64, 256), (64, 256), (256, 256), (704, 256), (704, 256), (256, 704)]
    assert ours["projection_bytes"] == {"projections": 2 * sum(n * k + 5 * n for n, k in shapes),
                                        "projections_model_dtype": 2 * sum(4 * n * k for n, k in shapes)}
    plain = rec["bytes_per_token_model_dtype"]
    assert ours["bytes_per_token"]["total"] == (plain["total"] - ours["projection_bytes"]["projections_model_dtype"]
                                                + ours["projection_bytes"]["projections"])
    assert ours["roofline_tok_s"] == pytest.approx(rec["copy_bandwidth_gbs"] * 1e9 / ours["bytes_per_token"]["total"])
    assert ours["fraction_of_roofline"] == pytest.approx(ours["decode_tok_s"] / ours["roofline_tok_s"])
    model, before = built
    after = dict(model.named_parameters())
    assert all(after[n] is p and torch.equal(p, copy) for n, (p, copy) in before.items())
    assert torch._inductor.config.save_config() == inductor and torch.get_float32_matmul_precision() == precision


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's int4 (tinygemm) runs on CUDA only")
def test_torchao_int4_on_cuda_records_its_error():
    """bf16 tiny on the GPU: every projection but down_proj (K=704, not a multiple of 128: left in
    bf16 and said so) in tinygemm's int4; its error against eager's teacher-forced logits."""
    model = build_model("tiny", CUDA, torch.bfloat16, layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(CUDA)
    ref, ref_logits = run_path(Path("eager", "dynamic", _eager_step), model, ids, 6, 1, None, None)
    forced = forced_reference(model, ids, ref.tokens)
    path = decode.torchao_path("torchao_int4")
    res, _ = run_path(path, model, ids, 6, 1, ref, ref_logits, forced=forced)
    assert not res.error and not res.not_run and res.weights == "int4", res
    assert len(path.setup.report.quantized) == 2 * 6 and 0 < res.quantization_error_max < 0.3
    assert [f[0] for f in path.setup.report.fallbacks] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert res.forced_steps == 6 and 0 < res.forced_max_rel_logit_err < 1
    assert all(type(p) is torch.nn.Parameter and p.device.type == "cuda" for p in model.parameters())
