"""Which op of the quantized decode step disagrees with the plain kernels it fuses, on the
model's own tensors (issue 35: on an H100 the tiny-model token test of ``weights="int4"``
diverged from the eager quantized model at the first decode step, while every int4 kernel
passed ``tileflow verify --device cuda`` at its test shapes).

Tiny qwen2 / llama as tests/integrations/test_patch_quantized.py builds them (fp32), patched
with int4 and fp8; one ``generate`` step captures the program and its cache; then, per layer,
each fused launch against its plain composition on the same inputs (fresh random x, cloned
caches): q / the K and V rows the qkv launch writes, the MLP's activation, o and down with
the residual. Prints one line per op with the relative error (fp32: expect < 1e-5), and first
each generated token's logits against one eager forward of the quantized model over the same
tokens, with eager's top-2 margin (a flip inside the error is a tie, not a fault).
    python3 benchmarks/quant_gpu_probe.py            # on the GPU (device_run: a plain command)
    python3 benchmarks/quant_gpu_probe.py --cpu      # the same on the CPU (interpreted Triton)
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def probe(kind: str, weights: str, device: str, options: dict) -> list[str]:
    import tileflow
    from tests.integrations.test_patch_quantized import eager_quantized, prompt, tiny
    from tileflow.integrations.transformers.quantized import QuantizedDecodeProgram
    from tileflow.runtime import ops

    captured = []
    real = QuantizedDecodeProgram.run

    def spy(self, tok, pos, cache, key_mask=None):
        if not captured:
            captured.append((self, pos.clone(), cache))
        return real(self, tok, pos, cache, key_mask)

    QuantizedDecodeProgram.run = spy
    try:
        model, ids = tiny(kind).to(device), prompt().to(device)
        ref = eager_quantized(model, weights)  # before patch: from the model's own weights
        report = tileflow.patch(model, options={**options, "weights": weights})
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True)
    finally:
        QuantizedDecodeProgram.run = real
    # the patched run's logits against one eager forward over its tokens (no generate: no
    # auto-compile), and eager's margin between its two best tokens: a flip within the error is a tie
    lines = []
    want = ref(out.sequences).logits[0, ids.shape[1] - 1:-1]
    for t, got in enumerate(out.logits):
        top = want[t].topk(2).values
        lines.append(f"{kind} {weights} step {t}: logits rel err {rel(got[0], want[t]):.2e}, max abs "
                     f"{(got[0] - want[t]).abs().max().item():.2e}, eager top-2 margin {(top[0] - top[1]).item():.2e}, "
                     f"argmax {int(got[0].argmax())} / {int(want[t].argmax())}")
    if not captured:
        return [f"{kind} {weights}: the program never ran ({report})"]
    prog, pos, cache = captured[0]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, model.config.hidden_size, device=device, generator=g)
    p = pos.reshape(-1)[:1]
    row = int(p)
    for i, (w, layer) in enumerate(zip(prog.layers, cache.layers)):
        where = f"{kind} {weights} layer {i}"
        if w.qkv_kind:
            kc, vc = layer.keys.clone(), layer.values.clone()
            q_f = ops.rms_norm_qkv_rope_cache_quant(w.qkv_kind, x, w.ln1, w.eps1, w.q.tensors, w.k.tensors,
                                                    w.v.tensors, w.q.bias, w.k.bias, w.v.bias, p, kc, vc,
                                                    prog.rope_cfg)
            h = ops.rms_norm(x, w.ln1, w.eps1)
            q_p = ops.rope_q(w.q(h).view(1, prog.nh, prog.dh), p, prog.rope_cfg)
            k_p = ops.rope_q(w.k(h).view(1, prog.nkv, prog.dh), p, prog.rope_cfg)
            v_p = w.v(h).view(1, prog.nkv, prog.dh)
            lines.append(f"{where} qkv: q {rel(q_f, q_p):.2e}  k row {rel(kc[0, :, row], k_p[0]):.2e}  "
                         f"v row {rel(vc[0, :, row], v_p[0]):.2e}")
        if w.mlp_kind:
            a_f = ops.rms_norm_gate_up_silu_quant(w.mlp_kind, x, w.ln2, w.eps2, w.gate.tensors, w.up.tensors)
            h2 = ops.rms_norm(x, w.ln2, w.eps2)
            lines.append(f"{where} gate_up: {rel(a_f, ops.silu_mul(w.gate(h2), w.up(h2))):.2e}")
        for name, kind_, lin, width in (("o", w.o_kind, w.o, prog.nh * prog.dh),
                                        ("down", w.down_kind, w.down, model.config.intermediate_size)):
            if kind_:
                a = torch.randn(1, width, device=device, generator=g)
                fused = ops.matvec_residual_quant(kind_, a, lin.tensors, x)
                lines.append(f"{where} {name}: {rel(fused, ops.residual_add(lin(a), x)):.2e}")
    tileflow.unpatch(model)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (interpreted Triton)")
    args = ap.parse_args()
    device, options = ("cpu", {"cpu": True, "cpu_target": "triton"}) if args.cpu else ("cuda", {})
    for kind, weights in (("qwen2", "int4"), ("llama", "int4"), ("qwen2", "fp8"), ("llama", "fp8")):
        for line in probe(kind, weights, device, options):
            print(line, flush=True)


if __name__ == "__main__":
    main()
