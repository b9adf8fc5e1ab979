"""The decode suite: one module per kernel, each a tile definition plus its reference.
Importing this package registers them all in ``KERNELS``."""

from tileflow.suite.registry import KERNELS, TARGETS, Case, SuiteKernel  # noqa: F401
from tileflow.suite import rms_norm  # noqa: F401
from tileflow.suite import matvec, matvec_pair, matvec_residual, gate_up_silu  # noqa: F401,E402
from tileflow.suite import embedding_lookup, rope_q, rope_k, gqa_attention  # noqa: F401,E402
from tileflow.suite import silu_mul, residual_add, argmax_greedy  # noqa: F401,E402
# DeepSeek-V2 / V3: multi-head latent attention and the mixture of experts
from tileflow.suite import mla_latent_cache, mla_attention, moe_router, moe_experts  # noqa: F401,E402
# low-precision weights: int4 groups (gpt-fast / torchao), fp8 128x128 blocks (DeepSeek)
from tileflow.suite import matvec_int4, matvec_fp8  # noqa: F401,E402
# fused decode patterns: several suite kernels' work in one launch (``fused=True``)
from tileflow.suite import qkv_rope_cache, rms_norm_gate_up_silu, rms_norm_matvec  # noqa: F401,E402
# their fused forms: the quantized decode layer's launches (norm + gate/up, residual, norm + q/k/v)
from tileflow.suite import matvec_quant_fused  # noqa: F401,E402
