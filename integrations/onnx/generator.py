"""Greedy decoding on ONNX Runtime with the KV cache kept in ORT-owned buffers.

Each step binds the previous step's ``present_*`` OrtValues as this step's
``past_*`` inputs (IO binding), so the cache never round-trips through numpy; only
the token id goes in and the logits come out.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np


def _meta(session, key: str) -> str:
    return session.get_modelmeta().custom_metadata_map[f"tileflow.{key}"]


class Generator:
    """``Generator("step.opt.onnx")``: greedy decode of a graph written by
    :func:`tileflow.onnx.export` (optimized or not).

    ``prefill``: the prompt graph from ``export(..., prefill_path=...)``; without it
    the prompt goes through the decode graph one token at a time, starting from an
    empty cache. ``threads``: ORT intra-op threads (``None``: ORT's default).
    """

    def __init__(self, step: str, prefill: Optional[str] = None, *, threads: Optional[int] = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self._ort = ort
        self.session = ort.InferenceSession(step, options, providers=list(providers))
        self.prefill = (ort.InferenceSession(prefill, options, providers=list(providers))
                        if prefill is not None else None)
        self.num_layers = int(_meta(self.session, "num_layers"))
        self.kv_heads = int(_meta(self.session, "num_kv_heads"))
        self.head_dim = int(_meta(self.session, "head_dim"))
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present_")]
        elem = self.session.get_inputs()[1].type  # e.g. "tensor(float)"
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[elem]
        self.device = "cpu"

    def _empty_cache(self) -> list:
        shape = (1, self.kv_heads, 0, self.head_dim)
        return [self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype), self.device)
                for _ in self.past_names]

    def _step(self, token: int, cache: list) -> tuple:
        """Run one decode step; returns (logits [vocab] numpy, new cache OrtValues)."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.array([[token]], dtype=np.int64))
        for name, value in zip(self.past_names, cache):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", self.device)
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy().reshape(-1), list(outs[1:])

    def _prompt(self, ids: Sequence[int]) -> tuple:
        if self.prefill is None or len(ids) < 2:
            cache, logits = self._empty_cache(), None
            for t in ids:
                logits, cache = self._step(int(t), cache)
            return logits, cache
        io = self.prefill.io_binding()
        io.bind_cpu_input("input_ids", np.asarray(ids, dtype=np.int64).reshape(1, -1))
        for o in self.prefill.get_outputs():
            io.bind_output(o.name, self.device)
        self.prefill.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy()[0, -1], list(outs[1:])

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 on_token: Optional[Callable[[int], None]] = None) -> list:
        """Greedy continuation of ``prompt`` (token ids): ``max_new_tokens`` ids."""
        if len(prompt) == 0:
            raise ValueError("prompt must hold at least one token")
        logits, cache = self._prompt(list(prompt))
        out = []
        for i in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if i + 1 < max_new_tokens:
                logits, cache = self._step(token, cache)
        return out

    def tokens_per_second(self, prompt: Sequence[int], max_new_tokens: int, warmup: int = 2) -> tuple:
        """(tok/s of the decode steps after the prompt, the tokens)."""
        self.generate(prompt, warmup)
        logits, cache = self._prompt(list(prompt))
        tokens, start = [], time.perf_counter()
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            logits, cache = self._step(token, cache)
        return max_new_tokens / (time.perf_counter() - start), tokens
