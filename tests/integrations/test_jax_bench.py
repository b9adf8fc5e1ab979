"""`tileflow bench --framework jax` on the tiny config (CPU): the record has the
protocol's keys, every path runs, and the tileflow paths decode the same greedy
tokens as plain jax.jit with every decode pattern swapped."""

import json

import pytest

pytest.importorskip("jax")


def test_jax_bench_record(tmp_path):
    from tileflow.cli import main

    assert main(["bench", "--framework", "jax", "--model", "tiny", "--prompt", "5", "--new", "8", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-jax-decode-tiny-p5.json")
    rec = json.loads(path.read_text())
    for key in ("device", "model", "roofline_tok_s", "paths", "versions", "bytes_per_token"):
        assert key in rec
    assert set(rec["paths"]) == {"jax_jit", "tileflow_jax_direct", "tileflow_jax_optimize"}
    for name, v in rec["paths"].items():
        assert not v["error"] and v["decode_tok_s"] > 0, (name, v["error"])
        assert v["device_loop_tok_s"] > 0 and v["device_loop_tokens_equal_host_loop"], name
        if name != "jax_jit":
            assert v["first_divergence"] is None and v["max_rel_logit_err"] < 1e-5
    assert rec["paths"]["tileflow_jax_optimize"]["fallbacks"] == []
    assert rec["paths"]["tileflow_jax_optimize"]["matches"]["gqa_attention"] == 4
