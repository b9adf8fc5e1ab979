"""tileflow bench on CPU: a local checkpoint folder (saved here) loads, the record has
the fields tools read, fp32 tileflow tokens equal eager's, the chart is written."""

import json

import pytest
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


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_bytes_per_token_of_a_mixture_of_experts_counts_the_chosen_experts_and_the_latent(name):
    model = build_model(name, torch.device("cpu"), torch.bfloat16)
    cfg = model.config
    b = bytes_per_token(model, 100)
    every = sum(p.numel() * p.element_size() for p in model.parameters())  # the router's weight stays fp32
    routed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0
    emb = model.get_input_embeddings().weight
    # only num_experts_per_tok of n_routed_experts experts' weights are read a token
    want = every - routed + routed * cfg.num_experts_per_tok / cfg.n_routed_experts - emb.numel() * 2 + emb.shape[1] * 2
    assert b["weights"] == int(want)
    # one shared latent row a position a layer, not K and V a head
    assert b["kv_cache"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 100 * 2


def test_layers_cuts_a_model_to_its_first_layers_at_its_real_widths():
    from tileflow.bench.checks import BenchError
    from tileflow.bench.models import model_config

    cfg = model_config("deepseek-v3", layers=4)
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 7168
    with pytest.raises(BenchError, match="61 layers"):
        model_config("deepseek-v3", layers=62)


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


def test_step_breakdown_charges_each_kernel_from_its_predecessor_end():
    """Overlapping (PDL) starts are not double-counted, idle device time is its own
    class, and the charges add up to the timeline's span."""
    from tileflow.bench import breakdown as bd

    timeline = [  # (name, start, end) in us, two steps
        ("qkv_rope_cache_matvec", 0.0, 5.0),
        ("gqa_attention_partial", 3.0, 9.0),  # started early, waited for qkv
        ("rms_norm_gate_up_silu_matvec", 9.5, 30.0),  # 0.5 us idle before it
        ("triton_red_fused_argmax_0", 30.0, 31.0),
        ("qkv_rope_cache_matvec", 40.0, 45.0),  # 9 us of host time between steps
        ("gqa_attention_partial", 44.0, 49.0),
        ("rms_norm_gate_up_silu_matvec", 49.0, 70.0),
        ("triton_red_fused_argmax_0", 70.0, 71.0),
    ]
    table = {"rms_norm_gate_up_silu": 42_000_000}
    rows = {r.name: r for r in bd.breakdown(timeline, 2, table)}
    assert rows["qkv_rope_cache"].us == 5.0 and rows["qkv_rope_cache"].launches == 1
    assert rows["gqa_attention"].us == 4.0  # 4 us past qkv's end, both steps
    assert rows["gqa_attention"].busy_us == 5.5
    assert rows["rms_norm_gate_up_silu"].us == 20.75
    assert abs(rows["rms_norm_gate_up_silu"].gbs - 42_000_000 / 20.75e3) < 1e-9
    assert rows["inductor kernels"].us == 1.0
    assert rows[bd.IDLE].us == (0.5 + 9.0 + 0.0) / 2
    assert abs(sum(r.us for r in rows.values()) * 2 - 71.0) < 1e-9
    assert bd.kernel_class("rms_norm_matvec_matvec") == "rms_norm_matvec"
    assert bd.kernel_class("rms_norm_rows") == "rms_norm"
    assert bd.kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "cuBLAS matmul"
    gaps = bd.idle_gaps(timeline, 2)  # the host's 9 us between steps first, then the launch gap
    assert gaps[0] == {"after": "inductor kernels", "before": "qkv_rope_cache", "us": 4.5, "gaps": 0.5,
                       "largest": {"after": "triton_red_fused_argmax_0", "before": "qkv_rope_cache_matvec", "us": 4.5}}
    assert gaps[1] == {"after": "gqa_attention", "before": "rms_norm_gate_up_silu", "us": 0.25, "gaps": 0.5,
                       "largest": {"after": "gqa_attention_partial", "before": "rms_norm_gate_up_silu_matvec",
                                   "us": 0.25}}
    assert len(gaps) == 2 and abs(sum(g["us"] for g in gaps) - rows[bd.IDLE].us) < 1e-9


def test_suite_bytes_add_up_to_the_roofline_weights():
    """The per-class byte table covers every weight the roofline counts (one embedding
    row, lm_head, every layer's projections)."""
    from tileflow.bench import breakdown as bd
    from tileflow.bench.models import build_model
    from tileflow.bench.roofline import bytes_per_token

    model = build_model("tiny", torch.device("cpu"), torch.float32)
    table = bd.suite_bytes(model.config, 10, 4)
    want = bytes_per_token(model, 10)
    assert table["gqa_attention"] == want["kv_cache"]
    weights = sum(v for k, v in table.items() if k != "gqa_attention")
    # the table also counts the K/V rows written and the norms' x reads: a few KB
    assert 0 <= weights - want["weights"] < 0.01 * want["weights"]


def test_decode_shapes_of_the_built_in_configs():
    """The leaderboard's --model shapes: the 1.5B config gives the registry's own 1.5B
    table, Llama-8B has no q/k/v biases, and every kernel builds its decode cases."""
    from tileflow.bench.models import builtin_config
    from tileflow.suite import KERNELS
    from tileflow.suite.registry import QWEN_1_5B, decode_shapes

    assert decode_shapes(builtin_config("deepseek-r1-distill-qwen-1.5b")) == QWEN_1_5B
    llama = decode_shapes(builtin_config("deepseek-r1-distill-llama-8b"))
    assert llama == dict(D=4096, NH=32, NKV=8, DH=128, INTER=14336, VOCAB=128256, BIAS=0)
    for kernel in KERNELS.values():
        for case in kernel.decode_cases(llama):
            kernel.build(kernel.params_for(case))
            assert case.sizes.get("HAS_BIAS", 0) == 0


def test_the_residual_kernel_is_charged_both_projections_bytes():
    """o_proj and down_proj run through the one ``matvec_residual`` kernel: its class
    carries both projections' bytes, and every class the table names is a suite kernel."""
    from tileflow.bench import breakdown as bd
    from tileflow.bench.models import builtin_config
    from tileflow.suite import KERNELS

    cfg = builtin_config("deepseek-r1-distill-qwen-1.5b")
    table = bd.suite_bytes(cfg, context=128, elem=2)
    d, inter = cfg.hidden_size, cfg.intermediate_size
    assert table["matvec_residual"] == cfg.num_hidden_layers * (d * d + inter * d) * 2
    assert set(table) <= set(KERNELS)
    assert bd.kernel_class("matvec_residual_kernel") == "matvec_residual"  # not taken for ``matvec``
    assert bd.kernel_class("matvec_kernel") == "matvec"


def test_divergence_records_eager_margin_and_deviation():
    from tileflow.bench.decode import Path, _eager_step, run_path

    model = build_model("tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    eager = Path("eager", "dynamic", _eager_step)
    ref, ref_logits = run_path(eager, model, ids, 6, 1, None, None)

    def nudged(m):  # the third decode step's runner-up pushed just past eager's choice
        inner, calls = _eager_step(m), [0]

        def step(tok, pos, cache):
            out = inner(tok, pos, cache).clone()
            calls[0] += 1
            if calls[0] % 5 == 3:  # warm-up and the run each take 5 steps
                top2 = out[0].topk(2)
                out[0, top2.indices[1]] = top2.values[0] + 1e-3
            return out
        return step

    res, _ = run_path(Path("nudged", "dynamic", nudged), model, ids, 6, 1, ref, ref_logits)
    assert res.first_divergence == 3
    top2 = ref_logits[2][0].topk(2).values
    assert abs(res.divergence_gap - (top2[0] - top2[1]).item()) < 1e-6
    assert res.divergence_max_abs_err > res.divergence_gap > 0


def test_the_record_names_the_switches_of_an_ab_run(monkeypatch, tileflow_options):
    from tileflow.bench import _commit, settings

    tileflow_options(early_inputs=False, jax_target="pallas")
    monkeypatch.setenv("TILEFLOW_COMMIT", "abc1234")
    got = settings()
    assert got["TILEFLOW_EARLY_INPUTS"] is False and got["TILEFLOW_JAX_TARGET"] == "pallas"
    assert "TILEFLOW_COMMIT" not in got and "TILEFLOW_PDL" not in got  # only what differs from the defaults
    assert _commit() == "abc1234"


def test_the_record_names_the_user_tuning_of_an_ab_run(monkeypatch, tmp_path):
    # an A/B through a tuning file (benchmarks/tuned/) differs only in the user's entries
    import json

    from tileflow.bench import _user_autotune

    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path))
    assert _user_autotune() == {}
    key = "Some GPU|matvec_residual|bf16|K=8960,M=1,N=1536"
    (tmp_path / "autotune.json").write_text(json.dumps({key: {"params": {"PIPELINE": 2}, "us": 0.0}}))
    assert _user_autotune() == {key: {"PIPELINE": 2}}


def test_batch_and_speculation_records(tmp_path, tileflow_options):
    """``--batch`` and ``--speculate``: generate on left-padded prompts per path (tokens
    equal across paths, the patched program counted), the step at 1-16 rows, and prompt
    lookup with its acceptance, in the record (tiny model, reference target on CPU)."""
    from tileflow.bench import run_bench

    tileflow_options(cpu=True, cpu_target="reference")
    rec = run_bench("tiny", prompt=12, new_tokens=6, paths=["tileflow_patch"], repeats=1, out_dir=str(tmp_path),
                    device="cpu", batch=3, speculate="lookup:3")
    assert rec["batch"] == 3 and rec["speculate"] == "lookup:3"
    gen = rec["batch_paths"]["tileflow_generate"]
    assert gen["rows"] == 3 and gen["patched_steps"] > 0 and gen["tokens_equal_generate_eager"], gen
    assert rec["batch_paths"]["generate_static_autocompile"]["tokens_equal_generate_eager"]
    assert [m for m in rec["step_cost"] if m != "patched_steps"] == [1, 2, 4, 8, 16]
    assert rec["step_cost"]["patched_steps"] > 0
    spec = rec["speculation"]
    assert spec["tokens_identical"] and spec["verify_steps"] > 0 and 0 < spec["acceptance"] <= 1, spec
    with pytest.raises(Exception, match="lookup:K or draft:K:MODEL"):
        run_bench("tiny", prompt=12, new_tokens=6, device="cpu", speculate="lookup", out_dir=str(tmp_path))


def test_a_draft_round_against_the_verify_step(tileflow_options):
    from tileflow.bench import rows
    from tileflow.bench.models import build_model

    tileflow_options(cpu=True, cpu_target="reference")
    target = build_model("tiny", torch.device("cpu"), torch.float32)
    draft = build_model("tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(1, target.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    out = rows.draft_round(target, draft, ids, k=4, repeats=1)
    assert out["verify_steps_ran"] > 0 and out["verify_step_ms"] > 0 and out["draft_round_ms"] > 0
    assert out["implied_speedup"]["0.9"] > out["implied_speedup"]["0.5"]


def test_quantized_bytes_per_token_by_hand():
    """``--weights``: tiny (D 256, inter 704, 8 heads / 2 KV of 32, 4 layers) in bf16. int4: a
    K=256 projection reads N*K/2 code bytes plus a bf16 scale and zero per 128 columns (N*136
    bytes); down_proj (K=704, not a multiple of 256) stays bf16. fp8: N*K bytes plus an fp32
    scale per 128 x 128 block. Everything else (embedding row, norms, lm_head, KV) as in bf16."""
    from tileflow.bench.roofline import quantized_bytes_per_token
    from tileflow.integrations.transformers.quantized import PROJECTIONS
    from tileflow.suite import quantize as Q

    model = build_model("tiny", torch.device("cpu"), torch.bfloat16)
    plain = bytes_per_token(model, 100)
    bf16 = 4 * (256 * 256 + 64 * 256 + 64 * 256 + 256 * 256 + 704 * 256 + 704 * 256 + 256 * 704) * 2
    int4 = 4 * ((256 + 64 + 64 + 256 + 704 + 704) * 136 + 256 * 704 * 2)
    blocks = lambda n, k: -(-n // 128) * -(-k // 128) * 4  # noqa: E731
    fp8 = 4 * sum(n * k + blocks(n, k) for n, k in
                  ((256, 256), (64, 256), (64, 256), (256, 256), (704, 256), (704, 256), (256, 704)))
    for fmt, want in (("int4", int4), ("fp8", fp8)):
        q = quantized_bytes_per_token(model, 100, fmt)
        assert q["projections_model_dtype"] == bf16 and q["projections"] == want, fmt
        assert q["weights"] == plain["weights"] - bf16 + want and q["kv_cache"] == plain["kv_cache"]
        assert q["total"] == q["weights"] + q["kv_cache"]
    # the layouts the quantizer really makes, tensor by tensor (int4's down_proj: the bf16 weight)
    made = {"int4": 0, "fp8": 0}
    for layer in model.model.layers:
        for part, name in PROJECTIONS:
            w = getattr(getattr(layer, part), name).weight
            made["fp8"] += sum(t.numel() * t.element_size() for t in Q.quantize_fp8(w))
            made["int4"] += (w.numel() * 2 if w.shape[1] % 256 else
                             sum(t.numel() * t.element_size() for t in Q.quantize_int4(w)))
    assert made == {"int4": int4, "fp8": fp8}


def test_bench_weights_int4_records_both_rooflines_and_the_error(tmp_path, capsys, tileflow_options):
    """``tileflow bench --weights int4``: the patch path quantizes (on CPU with ``cpu``, as the
    other CPU bench tests), the record has the int4 roofline beside the model dtype's, the
    report's per-layer error and the teacher-forced logit error and top-1 agreement."""
    from tileflow.cli import main

    tileflow_options(cpu=True, cpu_target="reference")
    out = tmp_path / "out"
    # two of tiny's four layers: the int4 reference matvec is slow on CPU (a test under ~10 s)
    assert main(["bench", "--model", "tiny", "--weights", "int4", "--new", "4", "--prompt", "8", "--paths",
                 "tileflow_patch", "--layers", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert "counting int4 projections" in " ".join(capsys.readouterr().out.split())  # the title says what is counted
    (written,) = out.glob("*.json")
    rec = json.loads(written.read_text())
    assert rec["weights"] == "int4"
    assert rec["bytes_per_token"]["total"] < rec["bytes_per_token_model_dtype"]["total"]
    assert rec["roofline_tok_s"] > rec["roofline_tok_s_model_dtype"]
    eager, ours = rec["paths"]["eager"], rec["paths"]["tileflow_patch"]
    assert eager["weights"] == "model" and "forced_top1_agreement" not in eager
    assert ours["weights"] == "int4" and not ours["error"], ours
    assert set(ours["quantization_error_per_layer"]) == {"model.layers.0", "model.layers.1"}
    assert 0 < ours["quantization_error_max"] < 0.3  # int4's measured error is ~0.1 a projection
    assert ours["forced_steps"] == 4 and 0 <= ours["forced_top1_agreement"] <= 1
    assert 0 < ours["forced_max_rel_logit_err"] < 1 and ours["forced_max_abs_logit_err"] > 0
    # the patch path's share is of the int4 roofline, eager's of the model dtype's
    assert ours["fraction_of_roofline"] == pytest.approx(ours["decode_tok_s"] / rec["roofline_tok_s"])
    assert eager["fraction_of_roofline"] == pytest.approx(eager["decode_tok_s"] / rec["roofline_tok_s_model_dtype"])


def test_bench_weights_where_patch_quantizes_nothing_says_so(tmp_path, tileflow_options):
    """On CPU without ``cpu`` the patch leaves the model unchanged: the path is recorded as
    having read the model's dtype, with the reason, and no quantization figures."""
    tileflow_options(cpu=False)
    rec = run_bench("tiny", prompt=4, new_tokens=2, paths=["tileflow_patch"], repeats=1, out_dir=str(tmp_path),
                    device="cpu", weights="fp8")
    ours = rec["paths"]["tileflow_patch"]
    assert rec["weights"] == "fp8" and ours["weights"] == "model" and "none quantized" in ours["note"]
    assert "quantization_error_max" not in ours


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_deepseek_suite_bytes_add_up_to_the_roofline_bytes(name):
    """The DeepSeek program's per-class table (fp32: the router's copy is its own bytes)
    covers what the roofline counts: the chosen experts' weights, the latent cache, the rest."""
    from tileflow.bench import breakdown as bd
    from tileflow.bench.models import build_model
    from tileflow.bench.roofline import bytes_per_token
    from tileflow.suite import KERNELS

    model = build_model(name, torch.device("cpu"), torch.float32)
    table = bd.suite_bytes(model.config, 10, 4)
    want = bytes_per_token(model, 10)
    assert set(table) <= set(KERNELS) and {"moe_experts", "moe_router", "mla_attention"} <= set(table)
    # the table also counts the latent rows written and the norms' x reads: a few KB
    assert 0 <= sum(table.values()) - want["total"] < 0.02 * want["total"], (sum(table.values()), want)


def test_the_fp8_checkpoint_forms_bytes_by_hand_and_its_refusal_line():
    """``--weights fp8-checkpoint`` on DeepSeek-R1-Distill-Llama-70B (bf16 outside the projections,
    prompt 128 + 256 new): 80 layers x 855,638,016 projection weights at 1 byte, 80 x 52,224
    fp32 block scales, 2 x 128256 x 8192 bf16 embeddings / lm_head and 161 x 8192 bf16 norms,
    327,680 cache bytes a position x 384. Where that does not fit: one line with the sum. Which
    form ``--weights fp8`` takes: the bf16 model on the device, its projections on the host."""
    from tileflow.bench import checks
    from tileflow.bench.models import model_config

    cfg = model_config("deepseek-r1-distill-llama-70b")
    est = checks.estimate_fp8_checkpoint(cfg, torch.bfloat16, 384)
    per_layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192
    assert per_layer == 855_638_016 and est.projections == 80 * per_layer
    scales = 80 * (2 * 64 * 64 + 2 * 8 * 64 + 3 * 224 * 64) * 4
    rest = 2 * 128256 * 8192 * 2 + (2 * 80 + 1) * 8192 * 2
    assert est.kv_bytes == 80 * 2 * 8 * 128 * 2 * 384 == 125_829_120
    assert est.total_bytes == 80 * per_layer + scales + rest + est.kv_bytes == 72_798_912_512
    with pytest.raises(checks.BenchError) as exc:
        checks.check_memory(est, "deepseek-r1-distill-llama-70b", torch.device("cuda:0"), 40 * 10**9, 80)
    assert str(exc.value) == (
        "deepseek-r1-distill-llama-70b in the fp8 checkpoint form (bf16 outside the projections) needs about 72.8 GB "
        "(68.45 B fp8 projection weights x 1 byte + 17 MB fp32 block scales + 4.2 GB bf16 embeddings / norms / "
        "lm_head + 126 MB KV cache), more than the 40.0 GB available on cuda:0; or its first layers only "
        "(--layers N, of 80)")
    checks.check_memory(est, "70b", torch.device("cuda:0"), 80 * 10**9, 80)  # fits an 80 GB card
    dense = checks.estimate(cfg, torch.bfloat16, torch.device("cpu"), 384)
    assert dense.total_bytes == 141_233_242_112
    h200, h100, host = 149 * 10**9, 84 * 10**9, 130 * 10**9
    bf16_projections = 2 * est.projections
    assert checks.quantize_at_patch_problem(dense, bf16_projections, torch.device("cuda"), h100, host) == (
        "the bf16 model (141.2 GB with the cache) does not fit the 84.0 GB available on cuda")
    assert checks.quantize_at_patch_problem(dense, bf16_projections, torch.device("cuda"), h200, host) == (
        "its bf16 projections (136.9 GB), which the patch moves to host memory, do not fit the 130.0 GB available there")
    assert checks.quantize_at_patch_problem(dense, bf16_projections, torch.device("cuda"), h200, 2 * host) is None


def test_fp8_checkpoint_bytes_per_token_are_the_fp8_bytes_the_patch_reads():
    """The roofline of the fp8 checkpoint form counts its tensors as they lie: the same bytes
    ``--weights fp8`` counts for the model quantized at patch time; and its model-dtype roofline
    the bf16 model's bytes."""
    from tileflow.bench.roofline import fp8_checkpoint_bytes_per_token, quantized_bytes_per_token

    dense = build_model("tiny", torch.device("cpu"), torch.bfloat16)
    form = build_model("tiny", torch.device("cpu"), torch.bfloat16, fp8_checkpoint=True)
    assert type(form.model.layers[0].mlp.down_proj).__name__ == "FP8Linear"
    read, plain = fp8_checkpoint_bytes_per_token(form, 100)
    assert read == quantized_bytes_per_token(dense, 100, "fp8")
    assert plain == bytes_per_token(dense, 100)


def test_an_fp8_checkpoint_folder_builds_as_fp8linear(tmp_path):
    """``build_model`` on a fine-grained fp8 checkpoint folder: its FP8Linear tensors as stored
    (not transformers' bf16 dequantization on CPU); ``layers`` reads only the first layers."""
    from tileflow.integrations.transformers import fp8_checkpoint

    built = build_model("tiny", torch.device("cpu"), torch.float32, fp8_checkpoint=True)
    fp8_checkpoint.save(built, str(tmp_path))
    for layers in (None, 1):
        model = build_model(str(tmp_path), torch.device("cpu"), torch.float32, layers)
        assert len(model.model.layers) == (layers or 4)
        q, want = model.model.layers[0].self_attn.q_proj, built.model.layers[0].self_attn.q_proj
        assert type(q).__name__ == "FP8Linear" and torch.equal(q.weight.float(), want.weight.float())
        assert torch.equal(q.weight_scale_inv, want.weight_scale_inv)


def test_bench_weights_fp8_builds_the_checkpoint_form_where_the_model_does_not_fit(tmp_path, capsys, monkeypatch,
                                                                                 tileflow_options):
    """``--weights fp8`` where the model in its dtype does not fit the device but its fp8
    checkpoint form does: the bench builds the FP8Linear form (no model-dtype projection) and
    says so; eager and the compiled paths are recorded as not run, with the reason, the eager
    comparisons as not measured, with the reason; the patch path runs every decode step through
    the quantized program, against the roofline of the fp8 bytes it reads."""
    from tileflow.bench import CHECKPOINT_NOT_MEASURED, CHECKPOINT_NOT_RUN, checks
    from tileflow.bench.models import model_config
    from tileflow.integrations.transformers.quantized import QuantizedDecodeProgram

    tileflow_options(cpu=True, cpu_target="reference")
    cfg = model_config("tiny", layers=2)
    dense = checks.estimate(cfg, torch.float32, torch.device("cpu"), 12).total_bytes
    fp8 = checks.estimate_fp8_checkpoint(cfg, torch.float32, 12).total_bytes
    assert fp8 < 0.7 * dense
    monkeypatch.setattr(checks, "available_bytes", lambda device: (dense + fp8) // 2)
    steps = []
    real_run = QuantizedDecodeProgram.run
    monkeypatch.setattr(QuantizedDecodeProgram, "run",
                        lambda self, tok, *a, **k: steps.append(tok.shape[1]) or real_run(self, tok, *a, **k))
    rec = run_bench("tiny", prompt=8, new_tokens=4, paths=["inductor", "tileflow_patch"], repeats=1, layers=2,
                    device="cpu", weights="fp8", out_dir=str(tmp_path))
    assert rec["weights"] == "fp8" and rec["weights_form"] == "fp8 checkpoint"
    assert rec["weights_form_why"].startswith("--weights fp8: the fp32 model (") and "does not fit" in rec["weights_form_why"]
    assert rec["device_bytes_estimate"] == fp8 and "fp8 projection weights x 1 byte" in rec["device_bytes_detail"]
    eager, inductor, ours = (rec["paths"][k] for k in ("eager", "inductor", "tileflow_patch"))
    assert eager["not_run"] == inductor["not_run"] == CHECKPOINT_NOT_RUN
    assert ours["weights"] == "fp8" and not ours["error"] and ours["decode_tok_s"] > 0, ours
    # warm-up and one repeat, three one-token decode steps each: every one the program's (a short
    # prompt may run through it too, as rows of one step)
    assert steps.count(1) == 2 * 3
    assert ours["not_measured"] == CHECKPOINT_NOT_MEASURED
    assert not {"first_divergence", "max_rel_logit_err", "quantization_error_max", "forced_top1_agreement"} & set(ours)
    assert 0 < ours["activation_error_max"] < 0.1 and set(ours["activation_error_per_layer"]) == {
        "model.layers.0", "model.layers.1"}
    assert rec["bytes_per_token"]["total"] < rec["bytes_per_token_model_dtype"]["total"]
    assert ours["fraction_of_roofline"] == pytest.approx(ours["decode_tok_s"] / rec["roofline_tok_s"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"eager: not run: {CHECKPOINT_NOT_RUN}" in out and "Traceback" not in out
    assert "not measured: forced_top1_agreement: eager did not run" in out


def test_bench_on_an_fp8_checkpoint_folder(tmp_path, tileflow_options):
    """A local fine-grained fp8 checkpoint folder: always the checkpoint form (its FP8Linear
    tensors as stored), whatever ``--weights`` says but int4 (one line); on CPU only with the
    ``cpu`` option (patch leaves the model unchanged otherwise, and FP8Linear has no CPU path)."""
    from tileflow.bench.checks import BenchError
    from tileflow.cli import main
    from tileflow.integrations.transformers import fp8_checkpoint

    folder = tmp_path / "ckpt"
    fp8_checkpoint.save(build_model("tiny", torch.device("cpu"), torch.float32, layers=1, fp8_checkpoint=True),
                        str(folder))
    tileflow_options(cpu=True, cpu_target="reference")
    assert main(["bench", "--model", str(folder), "--new", "3", "--prompt", "6", "--paths", "tileflow_patch",
                 "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("*.json")
    rec = json.loads(written.read_text())
    assert rec["weights"] == "fp8" and rec["weights_form"] == "fp8 checkpoint"
    assert rec["weights_form_why"].startswith("a fine-grained fp8 checkpoint folder")
    assert rec["paths"]["eager"]["not_run"] and not rec["paths"]["tileflow_patch"]["error"]
    with pytest.raises(BenchError, match=r"^\S+ is a fine-grained fp8 checkpoint: --weights int4 would re-quantize"):
        run_bench(str(folder), prompt=4, new_tokens=2, device="cpu", weights="int4", out_dir=str(tmp_path))
    tileflow_options(cpu=False)
    with pytest.raises(BenchError, match=r"in the fp8 checkpoint form on cpu: tileflow.patch leaves models unchanged"):
        run_bench("tiny", prompt=4, new_tokens=2, device="cpu", weights="fp8-checkpoint", out_dir=str(tmp_path))
