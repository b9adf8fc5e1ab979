"""The suite's registry: what every suite kernel module declares.

Each ``suite/<kernel>.py`` builds one :class:`SuiteKernel`: its tile definition (the
single source of every generated target), its reference (an array-API function that
serves torch and jax.numpy alike: float64 it is the oracle, fp32 the CPU path), the
sizes it is tested at, and the launch parameters it may be tuned over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from tileflow.tile.builder import TileBuilder
from tileflow.tile.ir import KernelIR

TARGETS = ("triton", "pallas", "reference")

# Sizes of DeepSeek-R1-Distill-Qwen-1.5B, the headline decode shape.
QWEN_1_5B = dict(D=1536, NH=12, NKV=2, DH=128, INTER=8960, VOCAB=151936, BIAS=1)


def decode_shapes(config) -> dict:
    """The sizes decode cases are built from (as ``QWEN_1_5B``), for a transformers
    Qwen2 / Llama config: Qwen2 projects q/k/v with biases, Llama only where
    ``attention_bias`` says so."""
    heads = config.num_attention_heads
    bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    return dict(D=config.hidden_size, NH=heads, NKV=config.num_key_value_heads,
                DH=getattr(config, "head_dim", None) or config.hidden_size // heads,
                INTER=config.intermediate_size, VOCAB=config.vocab_size, BIAS=int(bias))


@dataclass(frozen=True)
class Case:
    """One shape to run a kernel at: sizes, runtime scalars, a label."""

    label: str
    sizes: dict
    scalars: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # overrides of the default parameters
    dtypes: tuple = ()  # storage dtypes this case is checked in; () = all
    targets: tuple = ()  # targets that have what its parameters use (e.g. Triton's atomics); () = all

    def runs_on(self, target: str) -> bool:
        """Whether this case is checked on ``target``."""
        return not self.targets or target in self.targets


@dataclass
class SuiteKernel:
    name: str
    summary: str
    define: Callable[[TileBuilder, dict], None]
    reference: Callable[..., dict]
    default_params: Callable[[dict], dict]
    test_cases: list[Case]
    decode_cases: Callable[[dict], list[Case]]
    candidates: Callable[[dict], list[dict]] = lambda sizes: []
    # how to draw an input that is not plain normal floats: view -> fn(gen, shape, sizes)
    input_makers: dict = field(default_factory=dict)
    # bytes the kernel must move at least, for GB/s: fn(sizes, itemsize) -> int
    min_bytes: Optional[Callable[[dict, int], int]] = None
    # a fused decode pattern (several suite kernels' work in one launch) rather than
    # one of the suite kernels; verified the same way
    fused: bool = False
    # the sizes launch parameters depend on (autotune key); () = all. Lets a kernel
    # whose views carry e.g. the cache capacity share one measurement across capacities
    tune_keys: tuple = ()
    module: str = ""

    def structural_sizes(self, sizes: dict) -> dict:
        """The sizes that are also launch parameters (HAS_BIAS, ROPE_KIND, HAS_MASK, ...):
        they say what the kernel computes, so they win over any tuned parameter set."""
        defaults = self.default_params(sizes)
        return {k: v for k, v in sizes.items() if k in defaults}

    def params_for(self, case: Case) -> dict:
        """Default parameters at ``case``'s sizes, with the case's overrides."""
        return {**self.default_params(case.sizes), **case.params}

    def run_reference(self, xp, **args) -> dict:
        """The reference's outputs for the kernel's inputs and scalars ``args``."""
        return self.reference(xp, **args)

    def build(self, params: dict) -> KernelIR:
        """The tile IR for these parameters (a pure function of them)."""
        k = TileBuilder(self.name, params)
        self.define(k, params)
        return k.finish(self.summary)


KERNELS: dict[str, SuiteKernel] = {}


def register(kernel: SuiteKernel) -> SuiteKernel:
    if kernel.name in KERNELS:
        raise ValueError(f"suite kernel {kernel.name!r} registered twice")
    KERNELS[kernel.name] = kernel
    return kernel


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
