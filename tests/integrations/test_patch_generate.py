"""``generate`` on a patched model, as users call it: static cache, the default cache,
transformers' auto-compile (simulated on CPU with ``_compile_all_devices``) and the
user's own ``CompileConfig``: tokens equal to the unpatched model's and the whole-step
program counted as having run. Plus the guards: a cache that would overflow raises
before writing, replaced weights are followed."""

import pytest
import torch
import torch._dynamo.testing
from transformers import StaticCache
from transformers.generation import CompileConfig

import tileflow
from tests.integrations.test_transformers_patch import prompt, tiny
from tileflow.integrations.shared.hf import cache_keyword

NEW = 12


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kw)


def _compile_everywhere(backend="inductor"):
    cc = CompileConfig(backend=backend, fullgraph=False)
    cc._compile_all_devices = True  # what makes generate compile on CUDA, here on CPU
    return cc


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("how", ["static", "default", "auto_compile"])
def test_generate_runs_the_whole_step_program(kind, how):
    model, ids = tiny(kind), prompt()
    kw = {"static": dict(cache_implementation="static"), "default": {},
          "auto_compile": dict(cache_implementation="static", compile_config=_compile_everywhere())}[how]
    expected = generate(model, ids, **kw)
    torch._dynamo.reset()
    report = tileflow.patch(model)
    got = generate(model, ids, **kw)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert report.steps == NEW - 1, str(report)  # every decode step through the program, none compiled around it
    tileflow.unpatch(model)
    assert model.generation_config.cache_implementation is None
    assert not {"_valid_auto_compile_criteria", "_prepare_cache_for_generation", "forward"} & set(model.__dict__)


def test_user_compile_of_a_patched_forward_runs_the_patched_step():
    model, ids = tiny("qwen2"), prompt()
    expected = generate(model, ids, cache_implementation="static")
    report = tileflow.patch(model)
    model.forward = torch.compile(model.forward, backend="tileflow")
    got = generate(model, ids, cache_implementation="static")
    assert torch.equal(got, expected) and report.steps == NEW - 1, str(report)


def test_a_step_past_the_static_cache_raises_before_writing():
    model, ids = tiny("qwen2"), prompt(9)
    tileflow.patch(model)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(IndexError, match="static cache is full"):
        model.generate(ids, max_new_tokens=20, do_sample=False, **{cache_keyword(model): cache})
    assert int(cache.layers[0].cumulative_length) == 16  # nothing written past the end


def test_a_step_past_the_static_cache_raises_layer_by_layer(monkeypatch):
    model, ids = tiny("qwen2"), prompt(9)
    report = tileflow.patch(model)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(128))  # not the whole step: layer by layer
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(IndexError, match="static cache is full"):
        model.generate(ids, max_new_tokens=20, do_sample=False, **{cache_keyword(model): cache})
    assert report.replaced_by is not None


def test_a_replaced_linear_is_followed():
    model, ids = tiny("qwen2"), prompt()
    report = tileflow.patch(model)
    generate(model, ids, cache_implementation="static")
    old = model.model.layers[1].mlp.down_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(torch.randn_like(old.weight) * 0.3)
    model.model.layers[1].mlp.down_proj = new
    got = generate(model, ids, cache_implementation="static")
    tileflow.unpatch(model)
    assert torch.equal(got, generate(model, ids, cache_implementation="static"))
    assert report.replaced_by is not None and report.replaced_by.steps == NEW - 1


def test_the_weight_watch_is_invisible_to_a_users_compile():
    """The registration hooks run inside forwards (``self.layers[:n]`` builds a ModuleList);
    traced, they made dynamo guard on the watch table's size, which other models' patching
    or garbage collection changes: a recompile, or "Guard failed on the same frame"."""
    watched = [tiny("llama")]
    tileflow.patch(watched[0])  # installs the process-wide hooks
    model, ids = tiny("qwen2"), prompt()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model.forward, backend=counter)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    kw = {cache_keyword(model): cache}
    with torch.no_grad():
        model(ids, **kw, use_cache=True)
        for i in range(2):
            if i == 1:
                watched.append(tiny("llama"))
                tileflow.patch(watched[-1])  # the watch table grows
            compiled(input_ids=ids[:, :1], position_ids=torch.tensor([[ids.shape[1] + i]]), use_cache=True, **kw)
    torch._dynamo.reset()
    assert counter.frame_count == 1, counter.frame_count


def test_resized_embeddings_are_followed():
    model, ids = tiny("qwen2"), prompt()
    tileflow.patch(model)
    generate(model, ids, cache_implementation="static")
    model.resize_token_embeddings(160)
    with torch.no_grad():
        out = model(ids)
        assert out.logits.shape[-1] == 160
        got = generate(model, ids, cache_implementation="static")
    tileflow.unpatch(model)
    assert torch.equal(got, generate(model, ids, cache_implementation="static"))


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("bad", [128, -1, 10**6])
def test_out_of_range_token_ids_raise_like_the_model(bad, target, tileflow_options):
    from tileflow.runtime import ops

    tileflow_options(cpu_target=target)
    ops._LAUNCHERS.clear()
    model, ids = tiny("qwen2"), prompt()
    tileflow.patch(model)
    cache = StaticCache(config=model.config, max_cache_len=32)
    kw = {cache_keyword(model): cache}
    with torch.no_grad():
        model(ids, **kw)
        with pytest.raises(IndexError, match="out of range"):
            model(torch.tensor([[bad]]), position_ids=torch.tensor([[ids.shape[1]]]), **kw)
    ops._LAUNCHERS.clear()


def test_the_embedding_kernel_never_reads_outside_the_table(tileflow_options):
    """The GPU path cannot read ids back each token: the kernel itself must be safe."""
    from tileflow.runtime import ops

    tileflow_options(cpu_target="triton")
    ops._LAUNCHERS.clear()
    table = torch.randn(10, 64)
    out = torch.full((3, 64), 7.0)
    ops._launcher("embedding_lookup", {"M": 3, "V": 10, "D": 64}, table.dtype, table.device)(
        torch.tensor([3, 10**6, -1]), table, out)
    assert torch.equal(out[0], table[3]) and out[1:].isnan().all()
    ops._LAUNCHERS.clear()


def test_the_cache_write_kernel_never_writes_past_the_end(tileflow_options):
    from tileflow.integrations.transformers.compat import rope_config_of
    from tileflow.runtime import ops

    tileflow_options(cpu_target="triton")
    ops._LAUNCHERS.clear()
    torch.manual_seed(0)
    x, ln = torch.randn(1, 64), torch.ones(64)
    wq, wk, wv = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    kc, vc = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16)  # row 4 of head 0 would land in head 1
    rope, _ = rope_config_of(tiny("qwen2").config)
    ops.qkv_rope_cache(x, ln, 1e-6, wq, wk, wv, None, None, None, torch.tensor([4]), kc, vc, rope,
                       cache_pos=torch.tensor([4]))
    assert not kc.any() and not vc.any()
    ops._LAUNCHERS.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (transformers auto-compiles generate there)")
@pytest.mark.parametrize("how", ["static", "default", "compile_config"])
def test_generate_on_the_gpu_runs_the_graphed_step(how):
    """The crash the CPU cannot show: on CUDA generate compiles the forward itself for a
    static cache, and its CUDA graphs met the patched step's."""
    model, ids = tiny("qwen2"), prompt()  # fp32: tokens comparable with eager's
    model, ids = model.cuda(), ids.cuda()
    kw = {"static": dict(cache_implementation="static"), "default": {},
          "compile_config": dict(cache_implementation="static",
                                 compile_config=CompileConfig(mode="reduce-overhead"))}[how]
    expected = generate(model, ids, cache_implementation="static", disable_compile=True)  # eager, unpatched
    report = tileflow.patch(model)
    for _ in range(2):  # the second call replays the graph captured on the first call's cache
        got = generate(model, ids, **kw)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert report.steps == 2 * (NEW - 1), str(report)


def test_a_masked_attention_step_runs_the_tuned_tiles():
    """generate passes its attention mask, so its steps run attention with a key mask: they
    must find the tiles tuned for the step (the bench's loop has no mask), not the untuned
    defaults (on an H100 the 1.5B's generate ran ~20% below the patch loop that way)."""
    from tileflow.emit import autotune
    from tileflow.runtime import ops

    sizes = dict(B=1, NH=12, NKV=2, DH=128, S=512)
    tuned = dict(BLOCK_N=32, SPLITS=24, SPLITS_BLOCK=32, num_warps=8)
    key = autotune.tune_key("gqa_attention", sizes, "bf16", "cpu")
    with autotune.overriding({key: tuned}):
        plain = ops.tuned_params("gqa_attention", sizes, torch.bfloat16, torch.device("cpu"))
        masked = ops.tuned_params("gqa_attention", {**sizes, "HAS_MASK": 1}, torch.bfloat16,
                                  torch.device("cpu"))
    assert {k: plain[k] for k in tuned} == tuned
    assert {k: masked[k] for k in tuned} == tuned and masked["HAS_MASK"] == 1
