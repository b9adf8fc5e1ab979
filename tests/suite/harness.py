"""One parametrized verification test per suite kernel: every test case x target x
dtype, fresh random inputs, poisoned outputs, float64 reference (tileflow.verify)."""

import pytest

from tileflow.suite import KERNELS
from tileflow.suite.registry import TARGETS

DTYPES = ("bf16", "fp16", "fp32")


def kernel_matrix(name: str):
    kernel = KERNELS[name]
    params = []
    for case in kernel.test_cases:
        for target in TARGETS:
            if not case.runs_on(target):
                continue
            for dtype in DTYPES:
                if case.dtypes and dtype not in case.dtypes:
                    continue
                params.append(pytest.param(case, target, dtype, id=f"{case.label}-{target}-{dtype}"))
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
