"""One parametrized verification test per suite kernel: every test case x target x
dtype, fresh random inputs, poisoned outputs, float64 reference (tileflow.verify).

The default run checks the subset ``tileflow.verify.verification_matrix`` picks (every
kernel x target x dtype and every case x target at least once); the rest of the sweep
is marked ``full`` and runs under ``pytest --full`` (as ``tileflow verify --full``)."""

import pytest

from tileflow.suite import KERNELS
from tileflow.verify import verification_matrix


def kernel_matrix(name: str):
    kernel = KERNELS[name]
    default = {(case.label, target, dtype) for case, target, dtype in verification_matrix(kernel)}
    params = []
    for case, target, dtype in verification_matrix(kernel, full=True):
        marks = () if (case.label, target, dtype) in default else (pytest.mark.full,)
        params.append(pytest.param(case, target, dtype, id=f"{case.label}-{target}-{dtype}", marks=marks))
    return kernel, params


def make_test(name: str):
    kernel, params = kernel_matrix(name)

    @pytest.mark.parametrize("case,target,dtype", params)
    def test_matches_reference(case, target, dtype, record_verification):
        from tileflow.verify import verify

        result = verify(kernel, case, dtype, target)
        record_verification(result)
        assert result.ok, result.line()

    return test_matches_reference
