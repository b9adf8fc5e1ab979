"""torchao's weight-only int8 / int4 under ``torch.compile(mode="reduce-overhead")``: the
comparison paths of ``tileflow bench --weights int4|fp8`` (issue 35), on the same model object
and card as the patch paths, with their error measured as theirs is.

What they compute (torchao's ``quantize_`` on the q/k/v/o and gate/up/down projections of every
decoder layer, the set ``tileflow.patch(options={"weights": ...})`` quantizes; the embeddings,
norms and lm_head stay in the model's dtype, as there):

- ``torchao_int8``: ``Int8WeightOnlyConfig(version=2)``, symmetric per output row: scale =
  max |w| of the row / 127.5 (in the model's dtype), codes round(w / scale) in [-128, 127];
  ``y = (x @ codes.T.to(x.dtype)) * scale`` (inductor fuses the cast, the matmul and the scale).
- ``torchao_int4``: ``Int4WeightOnlyConfig(group_size=128, int4_packing_format=
  "tile_packed_to_4d")``: tinygemm's layout and kernel (``aten._weight_int4pack_mm``; the default
  "plain" format needs the separate mslk kernels). Asymmetric per 128 input columns of a row:
  scale s = (max - min) / 15 and zero z = min + 8 s, both bf16; codes q = round((w - min) / s)
  in [0, 15]; w ~ (q - 8) s + z. K is zero-padded to a multiple of 1024 and N to one of 8 (the
  padding is read too). bf16 weights and CUDA (compute capability 8.0+) only.

Neither needs torchao's C++ extension (int8: ``torch.mm``; int4: aten's tinygemm): a wheel
imported as a zip (``benchmarks/device_run.sh``) is enough.

No deep copy: ``quantize_`` gives each module a new ``weight`` (the original Parameter object is
left as it was); each original leaves for host memory (pinned on CUDA) as its module is
quantized, as the patch paths' originals do, and ``restore`` (the path's teardown) puts the same
Parameter objects back on their device: device memory holds the quantized copies instead of
the model-dtype weights while the path runs. ``quantize_`` also applies torchao's recommended
inductor settings (``set_inductor_config=True``, its default: coordinate-descent tuning and the
float32 matmul precision): part of how torchao is meant to run, and put back at teardown, so the
paths after are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

PATHS = {"torchao_int8": "int8", "torchao_int4": "int4"}
GROUP = 128  # int4's group size (torchao's default)


def unavailable(fmt: str, model) -> str:
    """'' where torchao can run ``fmt`` ("int8" / "int4") on ``model``, else why not, in one line."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the same answer: not run
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (f"torchao is not importable ({type(exc).__name__}: {msg}); pip install torchao "
                f"(the device machines: its wheel in .whl/, benchmarks/device_run.sh)")
    if fmt == "int4":
        weight = model.get_input_embeddings().weight
        if weight.device.type != "cuda":
            return "torchao's int4 weight-only (tinygemm, aten._weight_int4pack_mm) runs on CUDA only"
        if weight.dtype != torch.bfloat16:
            return f"torchao's int4 weight-only (tinygemm) takes bf16 weights only; this model is {weight.dtype}"
        major, minor = torch.cuda.get_device_capability(weight.device)
        if major < 8:
            return f"torchao's int4 tinygemm needs compute capability 8.0+; this card is {major}.{minor}"
    return ""


def config(fmt: str):
    """The torchao config of ``fmt`` (see the module docstring)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    if fmt == "int8":
        return Int8WeightOnlyConfig(version=2)
    if fmt == "int4":
        return Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    raise ValueError(f"torchao weights {fmt!r}: int8 or int4")


def _tensors_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of a tensor subclass's inner tensors (torchao's codes, scales...)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensors_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


@torch.no_grad()
def relative_error(module, original: torch.Tensor, seed: int) -> float:
    """The patch report's measure of its projections (``quantized.probe_error``): torchao's
    quantized weight against the original in fp32, on a random row in the weight's dtype."""
    from tileflow.integrations.transformers.quantized import probe_error

    return probe_error(lambda x: torch.nn.functional.linear(x, module.weight), original.float(), None,
                       original.dtype, seed)


@dataclass
class Report:
    """What ``_record_weights`` reads of a quantized path: each quantized projection's measured
    error, and what was left in the model's dtype (``(where, "torchao", why)``, as the patch
    report's fallbacks)."""

    quantized: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)


class TorchaoWeights:
    """A torchao path's setup (``Path.setup``): quantize the projections (originals to the host),
    then ``step(model)``: the bench's ``torch.compile(model.forward, mode="reduce-overhead")`` over
    the static-cache step, as its ``inductor_cudagraphs`` path; ``restore`` (``Path.teardown``)
    undoes it. Keeps the ``report`` and the projections' bytes before and after (the path's own
    roofline)."""

    def __init__(self, fmt: str, step: Callable):
        self.fmt, self.step = fmt, step
        self.report: Optional[Report] = None
        self.projections = self.projections_model_dtype = 0
        # (module, its original Parameter, what quantize_ put in its place, the original's device)
        self.saved: list = []
        self._inductor: Optional[bytes] = None
        self._precision: Optional[str] = None

    def __call__(self, model):
        from torchao.quantization import quantize_
        from torchao.utils import TorchAOBaseTensor

        from tileflow.integrations.transformers.quantized import PROJECTIONS

        why = unavailable(self.fmt, model)
        if why:  # run_path checks first; a direct call gets the same one line
            raise RuntimeError(why)
        self._inductor = torch._inductor.config.save_config()
        self._precision = torch.get_float32_matmul_precision()
        cfg = config(self.fmt)
        self.report = Report()
        self.projections = self.projections_model_dtype = 0
        try:
            for i, layer in enumerate(model.model.layers):
                for part, name in PROJECTIONS:
                    module = getattr(getattr(layer, part), name)
                    where = f"model.layers.{i}.{part}.{name}"
                    original = module.weight
                    quantize_(module, cfg)
                    self.saved.append((module, original, module._parameters["weight"], original.device))
                    self.projections_model_dtype += _tensors_bytes(original)
                    if not isinstance(module.weight, TorchAOBaseTensor):  # int4: K not a multiple of 128
                        self.report.fallbacks.append((where, "torchao", f"{self.fmt}: K={original.shape[1]} not a "
                                                      f"multiple of the group size {GROUP}: the model's dtype"))
                        self.projections += _tensors_bytes(original)
                        continue
                    self.projections += _tensors_bytes(module.weight)
                    self.report.quantized[where] = relative_error(module, original, len(self.report.quantized))
                    _to_host(original)
        except BaseException:  # half-quantized: the modules done so far get their weights back
            self.restore(model)
            raise
        return self.step(model)

    @torch.no_grad()
    def restore(self, model=None) -> None:
        """The original Parameters back on their device and in their modules (a weight replaced
        since stays), the inductor settings and float32 matmul precision as they were."""
        from tileflow.integrations.transformers.quantized import put_back

        put_back(self.saved)
        for module, *_ in self.saved:
            module.__dict__.pop("extra_repr", None)  # quantize_'s repr of the quantized weight
        self.saved = []
        if self._inductor is not None:
            torch._inductor.config.load_config(self._inductor)
            self._inductor = None
        if self._precision is not None:
            torch.set_float32_matmul_precision(self._precision)
            self._precision = None


@torch.no_grad()
def _to_host(param: torch.nn.Parameter) -> None:
    """A CUDA Parameter's data to pinned host memory (the same Parameter object); on CPU the
    host is the device: left where it is."""
    if param.device.type == "cuda":
        host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
        host.copy_(param)
        param.data = host
