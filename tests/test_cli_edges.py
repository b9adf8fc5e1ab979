"""Misuse of the ``tileflow`` command: every error is one line on stderr with a nonzero
exit and no traceback, and nothing is silently replaced or silently slow."""

import json

import pytest
import torch

from tileflow.cli import main


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that does start writes its record here, not in the repository


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``tileflow ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--prompt", "-5"], "--prompt"),
    (["bench", "--prompt", "0"], "--prompt"),
    (["bench", "--prompt", "abc"], "--prompt"),
    (["bench", "--new", "0"], "--new"),
    (["bench", "--new", "1"], "--new"),  # no decode step to time
    (["bench", "--repeats", "0"], "--repeats"),
    (["tune", "--prompt", "0"], "--prompt"),
    (["tune", "--tokens", "1"], "--tokens"),
    (["tune", "--repeats", "-1"], "--repeats"),
    (["tune", "--max-variants", "0"], "--max-variants"),
    (["tune", "--passes", "-1"], "--passes"),
    (["tune", "--threshold", "-0.1"], "--threshold"),
    (["tune", "--threshold", "nan"], "--threshold"),
])
def test_numeric_flags_are_checked_by_the_parser(argv, needle, capsys):
    code, _, err = run(argv, capsys)
    line = one_line_error(code, err, needle)
    assert code == 2 and line.startswith(f"tileflow {argv[0]}: error: ")


def test_bench_prompt_zero_is_not_replaced_by_the_default(capsys, monkeypatch):
    import tileflow.bench

    seen = {}
    monkeypatch.setattr(tileflow.bench, "run_bench", lambda *a, **k: seen.setdefault("called", a))
    code, _, err = run(["bench", "--prompt", "0"], capsys)
    assert code == 2 and "called" not in seen


def test_verify_unknown_kernel(capsys):
    code, _, err = run(["verify", "nonexistent"], capsys)
    assert code == 2
    one_line_error(code, err, "nonexistent", "tileflow kernels list")


def test_verify_with_nothing_to_check_is_an_error(capsys):
    code, _, err = run(["verify", "rms_norm", "--targets"], capsys)
    one_line_error(code, err, "nothing to verify")


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
@pytest.mark.parametrize("cmd", [["verify", "rms_norm"], ["bench"]])
def test_device_cuda_without_cuda(cmd, capsys):
    code, _, err = run(cmd + ["--device", "cuda"], capsys)
    one_line_error(code, err, "CUDA")


def test_bench_unknown_device(capsys):
    code, _, err = run(["bench", "--device", "potato"], capsys)
    one_line_error(code, err, "--device", "potato")


def test_kernels_show_bad_assignment(capsys):
    code, _, err = run(["kernels", "show", "rms_norm", "--set", "BLOCK_D=abc"], capsys)
    one_line_error(code, err, "BLOCK_D=abc")
    code, _, err = run(["kernels", "show", "rms_norm", "--sizes", "D"], capsys)
    one_line_error(code, err, "NAME=VALUE")
    code, _, err = run(["kernels", "show", "rms_norm", "--sizes", "D=0"], capsys)
    one_line_error(code, err, "D=0", ">= 1")
    code, _, err = run(["kernels", "show", "rms_norm", "--sizes", "Q=5"], capsys)  # would be ignored
    one_line_error(code, err, "Q", "M, D")
    assert run(["kernels", "show", "matvec", "--sizes", "HAS_BIAS=0"], capsys)[0] == 0


# --------------------------------------------------------------- --model


def _bench(model, capsys, *extra):
    return run(["bench", "--model", str(model), "--prompt", "4", "--new", "3", "--repeats", "1",
                "--paths", "eager", *extra], capsys)


def test_empty_folder(tmp_path, capsys):
    code, _, err = _bench(tmp_path, capsys)
    one_line_error(code, err, str(tmp_path), "no config.json")


def test_corrupt_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": ')
    code, _, err = _bench(tmp_path, capsys)
    one_line_error(code, err, str(tmp_path / "config.json"), "not valid JSON", "line 1")


def test_config_without_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    code, _, err = _bench(tmp_path, capsys)
    one_line_error(code, err, "model_type")


def test_unsupported_model_type_names_the_supported_ones(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64).save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' own notes on the tiny config
    code, _, err = _bench(tmp_path, capsys)
    one_line_error(code, err, "'gpt2'", "qwen2", "llama")


def test_config_without_weights(tmp_path, capsys):
    from tileflow.bench.models import builtin_config

    builtin_config("tiny").save_pretrained(tmp_path)
    code, _, err = _bench(tmp_path, capsys)
    one_line_error(code, err, "no weights")


def test_missing_folder_and_file(tmp_path, capsys):
    code, _, err = _bench(tmp_path / "nope", capsys)
    one_line_error(code, err, "no such folder")
    (tmp_path / "f.json").write_text("{}")
    code, _, err = _bench(tmp_path / "f.json", capsys)
    one_line_error(code, err, "not a folder")


def test_unknown_name_lists_only_runnable_models(capsys):
    code, _, err = _bench("nope", capsys)
    one_line_error(code, err, "'nope'", "deepseek-r1-distill-qwen-1.5b", "deepseek-v2-lite", "tiny")


def test_a_model_too_big_for_the_machine_suggests_fewer_layers(capsys):
    code, _, err = _bench("deepseek-v3", capsys)
    one_line_error(code, err, "deepseek-v3", "--layers N, of 61")


def test_context_longer_than_the_model_allows(capsys):
    code, _, err = run(["bench", "--model", "tiny", "--prompt", "9000", "--new", "2"], capsys)
    one_line_error(code, err, "9002", "8192")


@pytest.mark.parametrize("extra,needles", [
    (["--framework", "jax"], ["--weights", "jax"]),
    (["--batch", "2"], ["--batch", "TILEFLOW_WEIGHTS=int4"]),
    (["--model", "tiny-deepseek-v2"], ["qwen2 / llama", "deepseek_v2"]),
])
def test_weights_refuses_what_it_would_not_quantize(extra, needles, capsys):
    code, _, err = run(["bench", "--model", "tiny", "--prompt", "4", "--new", "3", "--weights", "int4", *extra],
                       capsys)
    one_line_error(code, err, *needles)


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    code, _, err = _bench("tiny", capsys, "--out", str(tmp_path / "f"))
    one_line_error(code, err, "--out")


# -------------------------------------------------------- memory and time


def test_estimate_counts_parameters_and_cache():
    from tileflow.bench import checks
    from tileflow.bench.models import builtin_config

    cfg = builtin_config("deepseek-r1-distill-qwen-1.5b")
    est = checks.estimate(cfg, torch.float32, torch.device("cpu"), context=160)
    assert est.parameters == 1_777_088_000
    assert est.weights_bytes == 4 * est.parameters
    assert est.kv_bytes == 2 * 28 * 2 * 128 * 160 * 4
    big = checks.estimate(builtin_config("deepseek-r1-distill-llama-70b"), torch.float32, torch.device("cpu"), 160)
    assert big.total_bytes > 280e9


def test_a_model_larger_than_memory_is_refused_before_building(capsys, monkeypatch):
    from tileflow.bench import checks

    monkeypatch.setattr(checks, "available_bytes", lambda device: 16e9)
    code, _, err = run(["bench", "--model", "deepseek-r1-distill-llama-70b"], capsys)
    line = one_line_error(code, err, "deepseek-r1-distill-llama-70b", "GB", "16.0 GB available")
    assert "282" in line  # 70.55 B parameters in fp32


def test_a_large_model_on_cpu_warns_and_says_what_it_builds(capsys, monkeypatch):
    import tileflow.bench
    from tileflow.bench import checks

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(checks, "available_bytes", lambda device: 64e9)
    monkeypatch.setattr(tileflow.bench, "copy_bandwidth_gbs", lambda device: 10.0)
    monkeypatch.setattr(tileflow.bench, "build_model", stop)
    with pytest.raises(Stop):
        main(["bench", "--model", "deepseek-r1-distill-qwen-1.5b"])
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "7.1 GB" in warning[0] and "min" in warning[0], err
    assert "building deepseek-r1-distill-qwen-1.5b" in out


def test_a_small_model_does_not_warn(capsys, monkeypatch):
    from tileflow.bench import checks
    from tileflow.bench.models import builtin_config

    est = checks.estimate(builtin_config("tiny"), torch.float32, torch.device("cpu"), 64)
    assert checks.warning(est, "tiny", torch.device("cpu"), bandwidth_gbs=5.0, decode_steps=600) is None


def test_verify_api_names_valid_dtypes_and_targets():
    from tileflow.suite import KERNELS
    from tileflow.verify import verify

    k = KERNELS["rms_norm"]
    with pytest.raises(ValueError, match="dtype 'fp8'.*bf16, fp16, fp32"):
        verify(k, k.test_cases[0], "fp8", "triton")
    with pytest.raises(ValueError, match="target 'cuda'.*triton"):
        verify(k, k.test_cases[0], "fp32", "cuda")
