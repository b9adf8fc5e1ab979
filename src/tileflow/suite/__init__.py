"""The 13-kernel decode suite: one module per kernel, each a tile definition plus
its reference. Importing this package registers them all in ``KERNELS``."""

from tileflow.suite.registry import KERNELS, TARGETS, Case, SuiteKernel  # noqa: F401
from tileflow.suite import rms_norm  # noqa: F401
