"""tileflow bench on CPU: a local checkpoint folder (saved here) loads, the record has
the fields tools read, fp32 tileflow tokens equal eager's, the chart is written."""

import json

import torch
from transformers import AutoModelForCausalLM

from tileflow.bench import run_bench
from tileflow.bench.models import builtin_configs, build_model
from tileflow.bench.roofline import bytes_per_token


def test_builtin_configs_have_the_deepseek_distills():
    table = builtin_configs()
    for name in ("deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b",
                 "tiny"):
        assert name in table
    assert table["deepseek-r1-distill-qwen-1.5b"]["hidden_size"] == 1536


def test_bytes_per_token_counts_lm_head_and_one_embedding_row():
    model = build_model("tiny", torch.device("cpu"), torch.bfloat16)
    b = bytes_per_token(model, 100)
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert b["weights"] == total - emb.numel() * 2 + emb.shape[1] * 2
    cfg = model.config
    assert b["kv_cache"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 32 * 100 * 2


def test_bench_from_a_local_checkpoint(tmp_path):
    model = build_model("tiny", torch.device("cpu"), torch.float32)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    assert AutoModelForCausalLM.from_pretrained(ckpt).config.hidden_size == model.config.hidden_size
    rec = run_bench(str(ckpt), prompt=8, new_tokens=6, paths=["tileflow_patch"], repeats=1,
                    out_dir=str(tmp_path / "out"))
    assert {"device", "model", "roofline_tok_s", "paths"} <= set(rec)
    assert set(rec["paths"]) == {"eager", "tileflow_patch"}
    for p in rec["paths"].values():
        assert p["decode_tok_s"] > 0 and not p["error"]
    assert rec["paths"]["tileflow_patch"]["first_divergence"] is None  # fp32: identical tokens
    written = list((tmp_path / "out").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["model"] == str(ckpt)
    assert written[0].with_suffix(".png").exists()
