"""Time the first decode steps of torch.compile(backend="tileflow") one by one, with
dynamo's recompile and CUDA-graph logs on: where a slow compiled path spends its time."""

import faulthandler
import os
import sys
import time

# PROBE_DUMP=N: after N seconds print every thread's Python stack and exit (where a hang is)
if os.environ.get("PROBE_DUMP"):
    faulthandler.dump_traceback_later(float(os.environ["PROBE_DUMP"]), exit=True)

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.run_cli_uninstalled import map_source_packages  # noqa: E402

map_source_packages()
import tileflow  # noqa: E402,F401
from tileflow.bench.decode import make_cache  # noqa: E402
from tileflow.bench.models import build_model  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "reduce-overhead"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 12
dev = torch.device("cuda")
model = build_model("deepseek-r1-distill-qwen-1.5b", dev, torch.bfloat16)
ids = torch.randint(0, 1000, (1, 128), device=dev)
cache = make_cache("static", model, 128 + 64)
fwd = torch.compile(model.forward, backend="tileflow", mode=mode)
with torch.no_grad():
    tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    for i in range(steps):
        t0 = time.perf_counter()
        pos = torch.tensor([[128 + i]], device=dev)
        tok = fwd(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        tok = tok.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        print(f"step {i}: {1e3 * (time.perf_counter() - t0):9.1f} ms", flush=True)
from tileflow.integrations.torch import backend  # noqa: E402

print(backend.LAST_REPORTS[-1] if backend.LAST_REPORTS else "no report")
print(torch._dynamo.utils.counters.get("stats"), dict(torch._dynamo.utils.counters.get("inductor", {})))
