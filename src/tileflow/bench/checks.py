"""What the bench checks before it builds a model: the device, and whether the weights
and KV cache fit the memory there; on CPU, a rough time estimate (a 1.5B model in fp32
takes minutes on a laptop) so a long run is announced, never silent.

Errors are :class:`BenchError`, whose message is one line the ``tileflow`` command
prints as it is."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from tileflow.bench.roofline import cache_bytes_per_position


class BenchError(ValueError):
    """A bench run that cannot start; the message is one line for the user."""


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` (default: cuda when there is one, else cpu) as a torch device the bench
    runs on, or a BenchError that says why not."""
    text = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device {text}: not a device name torch knows (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {text}: the bench runs on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise BenchError(f"--device {text}: torch sees no CUDA GPU here ({build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


@dataclass
class Estimate:
    parameters: int
    bytes_per_parameter: int
    weights_bytes: int
    kv_bytes: int  # a static cache of the whole context
    dtype: str
    copies: int = 1  # of the weights, held at once
    detail: str = ""  # what the bytes are, where not parameters x bytes (the fp8 checkpoint form)
    projections: int = 0  # the fp8 checkpoint form: the projections' parameters (1 byte each)

    @property
    def total_bytes(self) -> int:
        return self.copies * self.weights_bytes + self.kv_bytes


def size_text(n: float) -> str:
    """Bytes as GB (MB, kB when small)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def count_text(n: int) -> str:
    """A parameter count as B / M."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def parameter_count(config) -> int:
    """Parameters of the causal LM ``config`` describes, counted on the meta device
    (nothing allocated; tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def estimate(config, dtype: torch.dtype, device: torch.device, context: int) -> Estimate:
    """Bytes the bench needs on ``device``: every weight in ``dtype`` and a static KV
    cache of ``context`` tokens."""
    n = parameter_count(config)
    size = torch.empty((), dtype=dtype).element_size()
    kv = cache_bytes_per_position(config, size) * context
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return Estimate(n, size, n * size, kv, name)


def estimate_fp8_checkpoint(config, dtype: torch.dtype, context: int) -> Estimate:
    """Bytes the fp8 checkpoint form of ``config`` takes on its device (``--weights
    fp8-checkpoint``, ``tileflow.integrations.transformers.fp8_checkpoint``), counted on the meta
    device: the projections' e4m3 codes (1 byte a weight) and fp32 scales (4 bytes a 128 x 128
    block), the embeddings, norms and lm_head in ``dtype``, a static KV cache of ``context``
    tokens in ``dtype``. The patch reads these tensors where they lie: nothing is added but the
    step's activations, logits and graphs (MBs). DeepSeek-R1-Distill-Llama-70B in bf16 at 384
    tokens: 68.45 GB codes + 16.7 MB scales + 4.20 GB embeddings / lm_head / norms + 126 MB cache
    = about 72.8 GB (the bf16 model: 141.1 GB + the cache)."""
    from tileflow.integrations.transformers.fp8_checkpoint import meta_model

    model = meta_model(copy.deepcopy(config), dtype)
    size = torch.empty((), dtype=dtype).element_size()
    codes = scales = rest = params = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if p.dtype == torch.float8_e4m3fn:
            codes += n
            params += p.numel()
        elif name.endswith("weight_scale_inv"):
            scales += n
        else:
            rest += n
            params += p.numel()
    kv = cache_bytes_per_position(config, size) * context
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    detail = (f"{count_text(codes)} fp8 projection weights x 1 byte + {size_text(scales)} fp32 block scales + "
              f"{size_text(rest)} {name} embeddings / norms / lm_head + {size_text(kv)} KV cache")
    return Estimate(params, 1, codes + scales + rest, kv, f"the fp8 checkpoint form ({name} outside the projections)",
                    detail=detail, projections=codes)


def quantize_at_patch_problem(dense: Estimate, projection_bytes: int, device: torch.device,
                              available: Optional[int], host_available: Optional[int]) -> Optional[str]:
    """Why ``--weights fp8`` cannot build the model in its dtype and quantize it at patch time
    (the bench then builds the fp8 checkpoint form), or None: the model in its dtype (``dense``)
    must fit the device's ``available`` bytes, and on CUDA its projections
    (``projection_bytes``, which ``patch`` moves to pinned host memory until ``unpatch``) the
    host's ``host_available`` bytes."""
    if available is not None and dense.total_bytes > available:
        return (f"the {dense.dtype} model ({size_text(dense.total_bytes)} with the cache) does not fit the "
                f"{size_text(available)} available on {device}")
    if device.type == "cuda" and host_available is not None and projection_bytes > host_available:
        return (f"its {dense.dtype} projections ({size_text(projection_bytes)}), which the patch moves to host memory, "
                f"do not fit the {size_text(host_available)} available there")
    return None


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit, if it has one."""
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            with open(used) as f:
                return int(text) - int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: the driver's free bytes; CPU: MemAvailable, or
    psutil's figure, capped by a cgroup limit), or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        if free is None:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                pass
    room = _cgroup_room()
    if room is not None:
        free = room if free is None else min(free, room)
    return free


def check_memory(est: Estimate, label: str, device: torch.device, available: Optional[int],
                 layers: Optional[int] = None) -> None:
    """A BenchError when ``est`` does not fit the ``available`` bytes (``layers``: the
    model's decoder layers, to suggest measuring fewer)."""
    if available is None or est.total_bytes <= available:
        return
    more = f"; or its first layers only (--layers N, of {layers})" if layers and layers > 1 else ""
    if est.detail:
        raise BenchError(f"{label} in {est.dtype} needs about {size_text(est.total_bytes)} ({est.detail}), more than "
                         f"the {size_text(available)} available on {device}{more}")
    hint = ""
    if est.bytes_per_parameter > 2:
        hint = f"; in bf16 (--dtype bf16) about {size_text(est.copies * est.parameters * 2 + est.kv_bytes // 2)}"
    copies = f" x {est.copies} copies" if est.copies > 1 else ""
    raise BenchError(f"{label} in {est.dtype} needs about {size_text(est.total_bytes)} ({count_text(est.parameters)} "
                     f"parameters x {est.bytes_per_parameter} bytes{copies} + {size_text(est.kv_bytes)} KV cache), more than the "
                     f"{size_text(available)} available on {device}{hint}{more}")


def _init_seconds(parameters: int) -> float:
    """Seconds a random init of ``parameters`` takes here: the faster of two timed
    normal_ passes, times three (a 1.5B build on 2 cores took about three passes' time)."""
    x = torch.empty(1 << 22)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        x.normal_(0.0, 0.02)
        best = min(best, time.perf_counter() - t0)
    return 3 * parameters * best / x.numel()


def warning(est: Estimate, label: str, device: torch.device, bandwidth_gbs: float, decode_steps: int,
            available: Optional[int] = None, quiet_s: float = 60.0) -> Optional[str]:
    """One line announcing a long CPU run (at least ``quiet_s``), or None: the build plus
    ``decode_steps`` steps that each read every weight at ``bandwidth_gbs`` (a floor)."""
    if device.type != "cpu":
        return None
    build = _init_seconds(est.parameters)
    decode = decode_steps * est.total_bytes / max(bandwidth_gbs * 1e9, 1.0)
    if not math.isfinite(build + decode) or build + decode < quiet_s:
        return None
    room = f" of {size_text(available)} available" if available else ""
    return (f"{label} on cpu: about {size_text(est.total_bytes)}{room}; the run takes at least {_duration(build + decode)} "
            f"(build ~{_duration(build)}, {decode_steps} decode steps reading {size_text(est.total_bytes)} each at "
            f"{bandwidth_gbs:.0f} GB/s); 'tiny' or a GPU is quicker")
