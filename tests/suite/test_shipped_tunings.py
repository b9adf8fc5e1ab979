"""Every parameter set the shipped tuning tables hold (``tileflow/data/autotune.json``:
picked on GPUs by the leaderboard or by ``tileflow tune``) builds and matches the
reference under the Triton interpreter, at the kernel's first small test case: a
tuned entry is launched as it stands on that GPU, with no verification there."""

import pytest

from tileflow.emit import autotune
from tileflow.suite import KERNELS


def shipped_parameter_sets():
    seen, out = set(), []
    for key, entry in sorted(autotune.shipped_table().items()):
        device, name, dtype, _ = key.split("|")
        if name not in KERNELS:
            continue
        frozen = (name, tuple(sorted(entry["params"].items())))
        if frozen in seen:
            continue
        seen.add(frozen)
        out.append(pytest.param(name, entry["params"], id=f"{name}-{device.replace(' ', '_')}-{len(out)}"))
    return out


@pytest.mark.parametrize("name,tuned", shipped_parameter_sets())
def test_shipped_parameters_match_the_reference(name, tuned, record_verification):
    from tileflow.verify import verify

    kernel = KERNELS[name]
    case = next(c for c in kernel.test_cases if c.runs_on("triton") and not c.params)
    # what the case computes (bias, rope kind, masks) wins over the tuned set, as in ops
    params = {**kernel.params_for(case), **tuned, **kernel.structural_sizes(case.sizes)}
    result = verify(kernel, case, "bf16", "triton", params=params)
    record_verification(result)
    assert result.ok, result.line()


def test_the_tables_hold_entries_for_the_decode_kernels():
    names = {key.split("|")[1] for key in autotune.shipped_table()}
    assert {"qkv_rope_cache", "gqa_attention", "rms_norm_gate_up_silu", "matvec_residual"} <= names


def test_every_tuned_key_names_a_suite_kernel():
    """A key whose kernel name is not registered (a rename not carried into a table) would
    never be looked up: the kernel would launch its untuned defaults without a word."""
    import json
    from pathlib import Path

    tables = {"shipped": autotune.shipped_table()}
    for path in sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "tuned").glob("*.json")):
        tables[path.name] = json.loads(path.read_text())
    stale = {(table, key) for table, entries in tables.items() for key in entries if key.split("|")[1] not in KERNELS}
    assert not stale, sorted(stale)[:5]
