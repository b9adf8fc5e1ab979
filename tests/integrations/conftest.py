"""The end-to-end tests that decode whole models run the generated Triton kernels
(under Triton's interpreter, ~30-80 s a model) once per test in the default run, on the
parameters below; their other Triton variants are marked ``full`` (``pytest --full``), and
every variant still runs on the reference target. The kernels themselves are verified on
Triton by tests/suite on every case."""

import pytest

# test function -> the parameters (besides cpu_target="triton") its default Triton run keeps
TRITON_ONCE = {
    "test_greedy_tokens_identical_to_eager_fp32": {"kind": "qwen2", "cache": "static"},
    "test_padded_prompt_runs_whole_steps_and_stays_exact": {"kind": "llama"},
    "test_explain_reports_every_layer_and_tokens_match_eager": {"kind": "llama"},
    "test_padding_mask_becomes_the_kernels_key_mask": {"hole": 2},
    "test_a_padded_batch_runs_the_whole_step_program": {"kind": "qwen2", "how": "static"},
    "test_prompt_lookup_verifies_through_the_program": {"kind": "llama"},
    "test_deepseek_tokens_identical_to_eager": {"kind": "v3"},
}


@pytest.hookimpl(tryfirst=True)  # before tests/conftest.py deselects what is marked full
def pytest_collection_modifyitems(config, items):
    for item in items:
        keep = TRITON_ONCE.get(getattr(item, "originalname", item.name))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if keep is not None and params.get("cpu_target") == "triton" and any(
                params.get(k) != v for k, v in keep.items()):
            item.add_marker(pytest.mark.full)
