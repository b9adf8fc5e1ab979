"""Every suite kernel's generated Triton compiles for Hopper (sm_90) as the GPU runs it,
with programmatic dependent launch on: no GPU needed (Triton's own ptxas builds the
cubin). CI's interpreter never takes the ``USE_PDL`` branches, so this is where the
L2 prefetch and the wait placement are checked: the weight prefetches come before
``griddepcontrol.wait``, no store does, and no load either unless the definition marks
it ``k.before_wait`` (weights, or inputs the caller vouches for with ``EARLY_INPUTS``);
and where the next launch is let in: ``griddepcontrol.launch_dependents`` once, after the
wait, or before it with ``LAUNCH_AT_START`` (the ``at-start`` jobs: the decode case with it).

The builds run in one child process for the whole module (a child per kernel paid the
imports twenty times): the interpreter, once on in this one (conftest), cannot be
turned off again. Each build's failure is reported by its own test."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PTR = {"T": "*bf16", "f32": "*fp32", "i32": "*i32", "i64": "*i64", "u8": "*u8", "f8e4m3": "*fp8e4nv"}


def _build(name: str, label: str = "") -> list[dict]:
    """Child side: compile each stage of ``name``'s first decode case (or its test case
    ``label``; ``at-start``: the decode case with ``LAUNCH_AT_START``) for sm_90."""
    import importlib.util
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget

    from tileflow.emit.cache import generate
    from tileflow.suite import KERNELS
    from tileflow.suite.registry import QWEN_1_5B

    kernel = KERNELS[name]
    at_start = label == "at-start"
    case = next(c for c in kernel.test_cases if c.label == label) if label and not at_start \
        else kernel.decode_cases(QWEN_1_5B)[0]
    params = {**kernel.params_for(case), **kernel.structural_sizes(case.sizes)}
    if at_start:
        params["LAUNCH_AT_START"] = 1
    ir = kernel.build(params)
    path = Path(tempfile.mkdtemp()) / f"{ir.name}_sm90.py"
    path.write_text(generate(ir, "triton"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    consts = {k: v for k, v in params.items() if k not in ("num_warps", "num_stages")}
    consts.update(USE_PDL=True, PREFETCH=True, EARLY=True, UPCAST=False, DOT_PREC="tf32")
    views = {v.name: v for v in ir.views}
    scalars = {s.name: s for s in ir.scalars}
    out = []
    for stage in [st.name for st in ir.stages]:
        fn = getattr(module, f"{ir.name}_{stage}")
        sig, constexprs = {}, {}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg], constexprs[arg] = "constexpr", consts[arg]
            elif arg.endswith("_ptr"):
                sig[arg] = _PTR[views[arg[:-4]].dtype]
            elif arg in scalars:
                sig[arg] = "fp32" if scalars[arg].dtype == "f32" else "i32"
            else:  # sizes and strides
                sig[arg] = "i32"
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": params.get("num_warps", 4),
                                           "num_stages": params.get("num_stages", 2)})
        ptx = compiled.asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        out.append({
            "stage": stage, "cubin_bytes": len(compiled.asm["cubin"]),
            "wait": body.find("griddepcontrol.wait"),
            "first_access": min((m.start() for m in re.finditer(r"\b(ld|st)\.global", body)), default=len(body)),
            "first_store": min((m.start() for m in re.finditer(r"\bst\.global", body)), default=len(body)),
            "prefetches": [m.start() for m in re.finditer(r"prefetch\.global\.L2", body)],
            "launches": [m.start() for m in re.finditer(r"griddepcontrol\.launch_dependents", body)],
            "prefetch_in_source": "prefetch.global" in fn.src,
            "early_in_source": "EARLY" in fn.arg_names,  # loads the definition marks k.before_wait
        })
    return out


def _names():
    from tileflow.suite import KERNELS

    return list(KERNELS)


# test cases whose parameters change the generated text: loads issued before the wait
# (EARLY_INPUTS: positions, lengths, the residual)
_EARLY_CASES = [("qkv_rope_cache", "early"), ("gqa_attention", "early"), ("matvec_residual", "early"),
                ("matvec_residual", "early")]


# the decode step's kernels with LAUNCH_AT_START (the option launch_at_start)
_AT_START_CASES = [(n, "at-start") for n in ("embedding_lookup", "qkv_rope_cache", "gqa_attention",
                                             "matvec_residual", "rms_norm_gate_up_silu", "rms_norm_matvec")]


_JOBS = [(n, "") for n in _names()] + _EARLY_CASES + _AT_START_CASES


def _build_each(jobs: list) -> dict:
    """Child side: every job's stages, or the traceback of its failed build."""
    import traceback

    out = {}
    for name, label in jobs:
        try:
            out[f"{name}/{label}"] = {"stages": _build(name, label)}
        except Exception:  # noqa: BLE001 - reported by that job's test
            out[f"{name}/{label}"] = {"error": traceback.format_exc()[-3000:]}
    return out


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, json.dumps(_JOBS)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,label", _JOBS)
def test_builds_for_sm90_with_prefetch_before_the_wait(name, label, builds):
    built = builds[f"{name}/{label}"]
    assert "error" not in built, built.get("error")
    stages = built["stages"]
    assert stages, f"{name}: no stage built"
    for st in stages:
        where = f"{name}{'/' + label if label else ''}/{st['stage']}"
        assert st["cubin_bytes"] > 0, where
        assert st["wait"] >= 0, f"{where}: no griddepcontrol.wait"
        assert st["wait"] < st["first_store"], f"{where}: a store before the wait"
        if (name, label) in _EARLY_CASES and st["stage"] != "combine":
            assert st["first_access"] < st["wait"], f"{where}: the early loads come after the wait"
        elif not st["early_in_source"]:
            assert st["wait"] < st["first_access"], f"{where}: a global load before the wait"
        if st["prefetch_in_source"]:
            assert st["prefetches"], f"{where}: the prefetch was dropped"
        assert len(st["launches"]) == 1, f"{where}: {len(st['launches'])} launch_dependents"
        if label == "at-start":
            assert st["launches"][0] < st["wait"] and st["launches"][0] < st["first_access"], \
                f"{where}: the next launch is let in after the wait or a load"
        else:
            assert st["launches"][0] > st["wait"], f"{where}: the next launch is let in before the wait"
        assert all(p < st["wait"] for p in st["prefetches"]), f"{where}: a prefetch after the wait"


if __name__ == "__main__":  # python test_triton_hopper_build.py '[["rms_norm", ""], ...]'
    print(json.dumps(_build_each(json.loads(sys.argv[1]))))
