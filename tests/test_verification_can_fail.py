"""The verifier catches broken kernels: an unwritten block (poison), a wrong
constant (error bound), a wrong tie rule (index mismatch). If these pass, no green
verification test means anything."""

import dataclasses

import pytest

from tileflow.suite import KERNELS
from tileflow.suite.registry import Case
from tileflow.verify import verify

def _variant(name, **changes):
    return dataclasses.replace(KERNELS[name], **changes)


@pytest.mark.parametrize("target", ("triton", "pallas"))
def test_unwritten_block_is_caught(target):
    def define(k, p):  # writes only the first column block of every row
        x = k.input("a", ("M", "N"))
        b = k.input("b", ("M", "N"))
        out = k.output("out", ("M", "N"))
        with k.stage("main", grid=("M",)):
            row = k.program_id(0)
            cols = k.range(0, "BLOCK", aligned=True)
            k.store(out, (row, cols), k.load(x, (row, cols)) + k.load(b, (row, cols)))

    broken = _variant("residual_add", define=define)
    r = verify(broken, Case("two-blocks", {"M": 2, "N": 40}, params={"BLOCK": 16}), "fp32", target)
    assert not r.ok and "NaN" in r.detail


@pytest.mark.parametrize("target", ("triton", "pallas"))
def test_wrong_constant_is_caught(target):
    rms = KERNELS["rms_norm"]

    def reference(xp, x, w, eps):  # the oracle disagrees with the kernel on eps by 1e3x
        return rms.reference(xp, x, w, eps * 1000)

    broken = _variant("rms_norm", reference=reference)
    r = verify(broken, Case("eps", {"M": 2, "D": 40}, {"eps": 1e-2}), "fp32", target)
    assert not r.ok and "over bound" in r.detail


@pytest.mark.parametrize("target", ("triton", "pallas"))
def test_tie_to_highest_index_is_caught(target):
    arg = KERNELS["argmax_greedy"]

    def reference(xp, logits):  # last maximal index instead of the first
        v = logits.shape[-1]
        flipped = xp.flip(logits, axis=-1)
        return {"out": v - 1 - xp.argmax(flipped, axis=-1)}

    broken = _variant("argmax_greedy", reference=reference)
    r = verify(broken, Case("ties", {"M": 2, "V": 300}, params={"BLOCK_V": 64, "BLOCK_P": 4}), "fp32", target)
    assert not r.ok and "wrong indices" in r.detail
    assert verify(arg, Case("ties", {"M": 2, "V": 300}, params={"BLOCK_V": 64, "BLOCK_P": 4}), "fp32", target).ok
