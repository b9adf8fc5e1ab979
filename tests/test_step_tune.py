"""``tileflow tune``: coordinate descent over the kernels of a patched decode step, timed as
whole steps. On CPU the step runs (reference target) but its speed does not depend on the
launch parameters, so a stand-in timer that charges the parameters in force plays the GPU:
the tests check that trials really change what the rebuilt step would launch, that only a
gain above the threshold is kept, and that nothing is written unless recorded."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import tileflow
from tileflow.bench import step_tune
from tileflow.bench.decode import make_cache
from tileflow.emit import autotune


@pytest.fixture
def patched_step(tmp_path, monkeypatch, tileflow_options):
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path))
    tileflow_options(cpu_target="reference")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=INTER, num_hidden_layers=2, vocab_size=128,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    cache = make_cache("static", model, 16)
    yield model, step_tune.patched_step_rebuilder(model, ids, cache)
    tileflow.unpatch(model)


INTER = 96  # the fixture's intermediate size: the down projection's K


def role(launch) -> str:
    """The kernel's name, or for the one residual matvec, which projection it runs."""
    if launch.name != "matvec_residual":
        return launch.name
    sizes = dict(launch.sizes)
    return "down" if sizes["K"] > sizes["N"] else "o"  # the MLP's reduction is the longer


def charge(costs: dict) -> float:
    """A stand-in step time: 1000 µs plus ``costs[(role, PIPELINE)]`` for each launch of
    the freshly built step, with the parameters in force."""
    return 1000.0 + sum(costs.get((role(launch), launch.params().get("PIPELINE", 0)), 0.0)
                        for launch in step_tune.launches_in_order())


def test_the_rebuilt_step_lists_its_decode_kernels(patched_step):
    _, rebuild = patched_step
    rebuild()
    names = [role(launch) for launch in step_tune.launches_in_order()]
    assert {"qkv_rope_cache", "gqa_attention", "o", "rms_norm_gate_up_silu", "down", "rms_norm_matvec"} <= set(names), names


def test_keeps_only_the_variants_that_pay(patched_step):
    _, rebuild = patched_step
    # down gains 30 us with the first round before the wait, qkv 2 (under the 0.5% threshold),
    # gate-up loses 40
    costs = {("down", 2): -30.0, ("qkv_rope_cache", 2): -2.0, ("rms_norm_gate_up_silu", 2): 40.0}
    result = step_tune.tune_step(rebuild, lambda: charge(costs), max_variants=3)
    assert result.baseline_us == 1000.0 and result.final_us == 970.0
    (key, kept), = result.chosen.items()
    assert "|matvec_residual|" in key and f"K={INTER}," in key and kept["PIPELINE"] == 2
    assert [t.change for t in result.trials if t.kept] == ["baseline", "PIPELINE: 0 -> 2"]
    # each kernel's incumbent was timed before its challengers, in the first round down's at
    # the old 1000 µs and lm_head's (after down) at 970; a second round kept nothing
    incumbents = [(t.kernel, t.us) for t in result.trials if t.change == "incumbent"]
    first = dict(reversed(incumbents))
    assert first["matvec_residual"] == 1000.0 and first["rms_norm_matvec"] == 970.0
    assert len(incumbents) == 2 * sum(1 for _ in step_tune.launches_in_order())
    # the trials ran under overrides only: the user's table is untouched, and the step
    # rebuilt now launches its old parameters again
    assert autotune.user_table() == {}
    rebuild()
    assert all(launch.params().get("PIPELINE", 0) == 0 for launch in step_tune.launches_in_order())


def test_a_second_pass_finds_what_a_neighbour_s_change_opened(patched_step):
    # qkv's first-round mode pays only once down has taken its own (the charge depends on
    # both): one pass misses it (qkv is tried before down), two find it, a third is not run
    _, rebuild = patched_step

    def costs_now():
        pipelined = {role(launch) for launch in step_tune.launches_in_order() if launch.params().get("PIPELINE") == 2}
        return 1000.0 - 30.0 * ("down" in pipelined) \
            - 20.0 * ({"down", "qkv_rope_cache"} <= pipelined) \
            + 20.0 * ("qkv_rope_cache" in pipelined and "down" not in pipelined)

    one = step_tune.tune_step(rebuild, costs_now, max_variants=3, passes=1)
    two = step_tune.tune_step(rebuild, costs_now, max_variants=3, passes=3)
    assert one.final_us == 970.0 and two.final_us == 950.0
    assert sorted(k.split("|")[1] for k in two.chosen) == ["matvec_residual", "qkv_rope_cache"]
    kernels = sum(1 for _ in step_tune.launches_in_order())
    incumbents = sum(t.change == "incumbent" for t in two.trials)
    assert incumbents == 3 * kernels  # pass 2 kept qkv, so pass 3 ran and kept nothing


def test_neighbours_are_one_change_away():
    launch = step_tune.Launch("matvec_residual", tuple(sorted(dict(M=1, N=1536, K=8960).items())),
                              torch.bfloat16, torch.device("cpu"))
    with autotune.overriding({launch.key: {**launch.params(), "PIPELINE": 2}}):
        current = launch.params()
        variants = step_tune.neighbours(launch, limit=8)
    assert current["PIPELINE"] == 2 and len(variants) == 8
    assert [v["PIPELINE"] for v in variants[:2]] == [0, 1]
    for v in variants:
        assert v != current and sum(v[k] != current.get(k) for k in v) == 1, v


def test_neighbours_keep_the_warps_and_try_nearest_values_first():
    from tileflow.suite import KERNELS

    # the H100's gate-up pick: 4 x 2048 tiles at 2 warps, where no candidate has 2 warps
    launch = step_tune.Launch("rms_norm_gate_up_silu", tuple(sorted(dict(M=1, N=8960, K=1536).items())),
                              torch.bfloat16, torch.device("cpu"))
    with autotune.overriding({launch.key: {**launch.params(), "BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 2}}):
        current = launch.params()
        variants = step_tune.neighbours(launch, limit=50)
    changes = [step_tune._change(current, v) for v in variants]
    assert "BLOCK_N: 4 -> 8" in changes and "BLOCK_N: 4 -> 2" in changes
    assert changes.index("BLOCK_K: 2048 -> 1024") < changes.index("BLOCK_K: 2048 -> 512") \
        < changes.index("BLOCK_K: 2048 -> 256")
    # attention's coupled parameters (SPLITS with SPLITS_BLOCK) change only as a candidate has them
    sizes = dict(B=1, DH=128, NH=12, NKV=2, S=512)
    attention = step_tune.Launch("gqa_attention", tuple(sorted(sizes.items())), torch.bfloat16,
                                 torch.device("cpu"))
    cands = KERNELS["gqa_attention"].candidates(sizes)
    current = attention.params()
    variants = step_tune.neighbours(attention, limit=50)
    changes = [step_tune._change(current, v) for v in variants]
    assert "SPLITS: 8 -> 16, SPLITS_BLOCK: 8 -> 16" in changes and "SPLITS: 8 -> 4, SPLITS_BLOCK: 8 -> 4" in changes
    assert changes.index("SPLITS: 8 -> 4, SPLITS_BLOCK: 8 -> 4") < changes.index("SPLITS: 8 -> 1, SPLITS_BLOCK: 8 -> 1")
    # two parameters that can each change alone are not paired (coordinate descent takes them in turn)
    assert not any(c.count("->") == 2 and "SPLITS" not in c for c in changes), changes
    for v in variants:
        changed = [k for k in v if v[k] != step_tune._value(current, k)]
        if changed[0] in ("PIPELINE", "num_warps"):
            continue
        assert any(all(v.get(k) == c[k] for k in c if k != "num_warps") for c in cands), changed


def test_overrides_win_and_are_undone(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path))
    sizes = dict(M=1, N=64, K=128)
    autotune.record("matvec_residual", sizes, "bf16", "Some GPU", {"BLOCK_K": 64}, 1.0)
    key = autotune.tune_key("matvec_residual", sizes, "bf16", "Some GPU")
    with autotune.overriding({key: {"BLOCK_K": 32}}):
        assert autotune.lookup("matvec_residual", sizes, "bf16", "Some GPU") == {"BLOCK_K": 32}
    assert autotune.lookup("matvec_residual", sizes, "bf16", "Some GPU") == {"BLOCK_K": 64}


def test_cli_says_why_it_cannot_tune_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU message does not apply")
    from tileflow.cli import main

    assert main(["tune", "--model", "tiny"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_command_records_what_it_kept(tmp_path, monkeypatch, tileflow_options):
    # the whole `tileflow tune` path (model, rebuilds, table, user table, JSON record), with
    # the tiny config on CPU standing in for a GPU and the stand-in timer
    import json

    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    tileflow_options(cpu_target="reference")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    costs = {("down", 2): -30.0}
    rec = step_tune.run_tune("tiny", prompt=5, tokens=4, max_variants=2, out_dir=str(tmp_path / "out"),
                             device="cpu", time_step=lambda: charge(costs))
    assert rec["baseline_us"] == 1000.0 and rec["final_us"] == 970.0 and rec["recorded"]
    (key, params), = rec["chosen"].items()
    assert "|matvec_residual|bf16|" in key and params["PIPELINE"] == 2
    assert autotune.user_table()[key]["params"] == params
    written, = (tmp_path / "out").glob("*-step-tune-tiny-p5.json")
    assert json.loads(written.read_text())["chosen"] == rec["chosen"]
    assert written.with_suffix(".png").stat().st_size > 10_000  # the trials' chart


def test_tries_run_first_and_the_best_that_pays_is_kept(patched_step):
    _, rebuild = patched_step
    costs = {("down", 2): -30.0, ("o", 2): -10.0, ("qkv_rope_cache", 2): -2.0, ("rms_norm_gate_up_silu", 2): 40.0}
    tries = ["rms_norm_gate_up_silu:PIPELINE=2", "matvec_residual:PIPELINE=2;qkv_rope_cache:PIPELINE=2",
             "argmax_greedy:BLOCK_V=64",  # argmax is not in the step
             "matvec_residual:PIPELINE=2"]
    result = step_tune.tune_step(rebuild, lambda: charge(costs), max_variants=3, passes=0, tries=tries)
    changes = [(t.change, t.us, t.kept) for t in result.trials]
    assert changes[1] == ("try rms_norm_gate_up_silu:PIPELINE=2", 1040.0, False)
    # a kernel named in a try changes at each of its launches: here both projections
    assert changes[2] == ("try matvec_residual:PIPELINE=2;qkv_rope_cache:PIPELINE=2", 958.0, True)
    assert "no launch of it" in changes[3][0] and not changes[3][2]
    # the residual matvec alone pays too, but the faster try already holds it
    assert changes[4] == ("try matvec_residual:PIPELINE=2", 960.0, False)
    assert len(changes) == 5 and result.final_us == 958.0  # passes=0: no descent after the tries
    assert sorted(k.split("|")[1] for k in result.chosen) == ["matvec_residual", "matvec_residual",
                                                               "qkv_rope_cache"]
    # the kept entries are whole parameter sets: the launch's own ones, changed as asked
    down = next(v for k, v in result.chosen.items() if f"K={INTER}," in k)
    assert down["PIPELINE"] == 2 and "BLOCK_K" in down


def test_parse_try_reads_kernels_and_values():
    assert step_tune.parse_try("gqa_attention:SPLITS=16,SPLITS_BLOCK=16;matvec_residual:PIPELINE=0") == {
        "gqa_attention": {"SPLITS": 16, "SPLITS_BLOCK": 16}, "matvec_residual": {"PIPELINE": 0}}
    with pytest.raises(ValueError, match="no suite kernel"):
        step_tune.parse_try("attention:SPLITS=16")
    with pytest.raises(ValueError, match="PARAM=VALUE"):
        step_tune.parse_try("gqa_attention:SPLITS")


def test_cli_reports_a_bad_try_before_anything_else(capsys):
    from tileflow.cli import main

    assert main(["tune", "--model", "tiny", "--try", "no_such_kernel:X=1"]) == 1
    assert "no suite kernel" in capsys.readouterr().err
