"""Greedy decoding on ONNX Runtime with the KV cache kept in ORT-owned buffers.

Each step binds the previous step's ``present_*`` OrtValues as this step's
``past_*`` inputs (IO binding), so the cache never round-trips through numpy; only
the token id goes in and the logits come out.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from tileflow.integrations.onnx.files import check_source

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_EXPECTED = {
    "decode": "inputs input_ids [1, 1] + past_key.<i> / past_value.<i>, outputs logits + "
              "present_key.<i> / present_value.<i>, and tileflow.* metadata (tileflow.onnx.export's step graph)",
    "prefill": "inputs input_ids [1, seq] only, outputs logits + present_key.<i> / present_value.<i> "
               "(tileflow.onnx.export's prefill_path graph)",
}


def _names(names: list, shown: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return "[" + ", ".join(names[:shown]) + more + "]"


def _check_graph(session, path: str, graph: str, num_layers: Optional[int]) -> dict:
    """The tileflow metadata of ``session``, if its graph is a tileflow ``graph``
    ("decode" or "prefill") graph of ``num_layers`` layers (None: from the metadata);
    a one-line ValueError naming what was expected and what the file holds otherwise."""
    meta = {k[len("tileflow."):]: v for k, v in session.get_modelmeta().custom_metadata_map.items()
            if k.startswith("tileflow.")}
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    role = "decode-step" if graph == "decode" else "prefill"
    found = f"it has inputs {_names(inputs)} and outputs {_names(outputs)}"

    def fail(why: str):
        return ValueError(f"{path!r} is not a tileflow {role} model ({why}): expected {_EXPECTED[graph]}; {found}")

    if graph == "decode" and meta.get("graph") == "prefill":
        raise ValueError(f"{path!r} is a tileflow prefill graph, not the decode step: pass it as "
                         f"Generator(step, prefill={path!r})")
    if graph == "prefill" and meta.get("graph") == "decode":
        raise ValueError(f"prefill {path!r} is a tileflow decode-step graph, not a prefill graph "
                         "(export(..., prefill_path=) writes that)")
    try:
        n = int(meta["num_layers"]) if num_layers is None else num_layers
        if graph == "decode":
            int(meta["num_kv_heads"]), int(meta["head_dim"])
    except (KeyError, ValueError):
        raise fail("no tileflow.num_layers / num_kv_heads / head_dim metadata") from None
    past = [f"past_{kv}.{i}" for i in range(n) for kv in ("key", "value")]  # exporter.cache_names, without torch
    present = ["present" + name[len("past"):] for name in past]
    want_in = ["input_ids", *past] if graph == "decode" else ["input_ids"]
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(["logits", *present]):
        raise fail(f"inputs / outputs differ from those of {n} layers")
    types = {i.name: i.type for i in session.get_inputs()}
    if types["input_ids"] != "tensor(int64)":
        raise fail(f"input_ids is {types['input_ids']}, not tensor(int64)")
    if graph == "decode" and types[past[0]] not in _DTYPES:
        raise fail(f"cache type {types[past[0]]}, not one of {sorted(_DTYPES)}")
    return meta


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

        step = check_source(step, "Generator step")
        if prefill is not None:
            prefill = check_source(prefill, "Generator prefill")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self._ort = ort
        self.session = ort.InferenceSession(step, options, providers=list(providers))
        self.prefill = (ort.InferenceSession(prefill, options, providers=list(providers))
                        if prefill is not None else None)
        meta = _check_graph(self.session, step, "decode", None)
        self.num_layers = int(meta["num_layers"])
        self.kv_heads = int(meta["num_kv_heads"])
        self.head_dim = int(meta["head_dim"])
        if self.prefill is not None:
            _check_graph(self.prefill, prefill, "prefill", self.num_layers)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present_")]
        self.dtype = _DTYPES[next(i.type for i in self.session.get_inputs() if i.name == "past_key.0")]
        # ids at or past the vocab would read out of the embedding (a negative one wraps)
        vocab = next(o.shape for o in self.session.get_outputs() if o.name == "logits")[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else (
            int(meta["vocab_size"]) if "vocab_size" in meta else None)
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

    def _check_ids(self, ids: Sequence[int]) -> list:
        ids = [int(t) for t in ids]
        if len(ids) == 0:
            raise ValueError("prompt must hold at least one token")
        for i, t in enumerate(ids):
            if t < 0 or (self.vocab_size is not None and t >= self.vocab_size):
                limit = f"in [0, {self.vocab_size})" if self.vocab_size is not None else "non-negative"
                raise IndexError(f"prompt token id {t} at position {i} is out of range: ids must be {limit} "
                                 f"(vocab size {self.vocab_size})")
        return ids

    def _prompt(self, ids: Sequence[int]) -> tuple:
        ids = self._check_ids(ids)
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
        logits, cache = self._prompt(prompt)
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
        logits, cache = self._prompt(prompt)
        tokens, start = [], time.perf_counter()
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            logits, cache = self._step(token, cache)
        return max_new_tokens / (time.perf_counter() - start), tokens
