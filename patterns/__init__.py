"""The catalogue of decode patterns (``tileflow.patterns``).

One module per pattern: what it matches, the exactness conditions under which the
replacement computes the same function (shapes, dtypes, constants such as eps and
theta, layouts), and the suite kernel that replaces it. Each integration (torch
inductor, jaxpr, ONNX) turns these definitions into its own matcher; the names are
the ones every ``tileflow.explain`` report uses.
"""

from tileflow.patterns import gate_up_silu, matvec, matvec_residual  # noqa: E402
from tileflow.patterns import gqa_attention, residual_rms_norm, rms_norm, rope  # noqa: E402

CATALOGUE = {m.NAME: m for m in (matvec, matvec_residual, gate_up_silu, rms_norm, residual_rms_norm, rope,
                                 gqa_attention)}
