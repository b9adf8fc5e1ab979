"""More than one row a step, timed as users run it: ``generate`` with a batch of
left-padded prompts, ``generate`` with prompt lookup, an assistant model's draft round
against the target's verify step, and the patched step's cost at M rows against one.

Every figure names the call it timed; decode = best run of N new tokens less best run
of one (the prompt pass not counted), as for the batch-1 ``generate`` paths."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from tileflow.integrations.shared.hf import cache_keyword


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded_batch(vocab: int, rows: int, prompt: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` prompts of different lengths (``prompt`` down to about half of it),
    left-padded to ``prompt`` with token 0, and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, prompt, dtype=torch.long)
    mask = torch.zeros(rows, prompt, dtype=torch.long)
    for i in range(rows):
        n = max(1, prompt - (i * prompt) // (2 * rows))
        ids[i, prompt - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, prompt - n:] = 1
    return ids.to(device), mask.to(device)


def time_generate(model, ids, new_tokens: int, repeats: int, kwargs: dict,
                  progress: Callable[[str], None] = lambda s: None, label: str = "") -> dict:
    """``model.generate(ids, max_new_tokens=N, **kwargs)``: aggregate decode tok/s over all
    rows (each run of N less the best run of one), TTFT, the warm-up's and the compile
    time, the new tokens of each row (the last run's)."""
    def once(n):
        _sync(ids.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, **kwargs)
        _sync(ids.device)
        return time.perf_counter() - t0, out[:, ids.shape[1]:]

    progress(f"{label}: warm-up")
    t0 = time.perf_counter()
    warm = once(new_tokens)[0]
    once(1)
    full, first, toks = [], [], None
    for r in range(repeats):
        progress(f"{label}: run {r + 1}/{repeats}")
        t, toks = once(new_tokens)
        full.append(t)
        first.append(once(1)[0])
    ttft = min(first)
    steps = toks.shape[1] - 1
    runs = [ids.shape[0] * steps / max(t - ttft, 1e-9) for t in full]
    compile_s = max(0.0, time.perf_counter() - t0 - sum(full) - sum(first) - warm)
    return {"decode_tok_s": max(runs), "runs_tok_s": runs, "ttft_s": ttft, "runs_ttft_s": first,
            "warmup_s": warm, "compile_s": compile_s, "rows": ids.shape[0], "new_tokens_per_row": toks.shape[1],
            "tokens": toks.tolist()}


def batch_paths(model, ids, mask, new_tokens: int, repeats: int, progress=lambda s: None) -> dict:
    """Per path, ``generate`` on the left-padded batch (greedy): the unpatched model with
    its default cache (eager), with a static cache (on CUDA transformers compiles the
    forward itself: inductor with CUDA graphs), and the patched model. Tokens compared
    with the first path's."""
    import tileflow

    base = dict(attention_mask=mask, do_sample=False)
    out: dict = {}
    first_tokens = None
    for name, kw, patched in (("generate_eager", {}, False),
                              ("generate_static_autocompile", {"cache_implementation": "static"}, False),
                              ("tileflow_generate", {}, True)):
        torch._dynamo.reset()
        report = tileflow.patch(model) if patched else None
        try:
            res = time_generate(model, ids, new_tokens, repeats, {**base, **kw}, progress, name)
            if report is not None:
                res["patched_steps"] = report.steps
                res["patch_fallbacks"] = [list(f) for f in report.fallbacks]
            tokens = res.pop("tokens")
            if first_tokens is None:
                first_tokens = tokens
            else:
                res["tokens_equal_generate_eager"] = tokens == first_tokens
        except Exception as e:  # noqa: BLE001 - a path that fails is reported, the others still run
            res = {"error": f"{type(e).__name__}: {e}"[:800]}
        finally:
            if patched:
                tileflow.unpatch(model)
        out[name] = res
    return out


def step_seconds(model, prompt, tokens: int, steps: int, repeats: int) -> float:
    """Seconds of one forward feeding ``tokens`` new tokens to each of the ``prompt``'s
    sequences (its rows) after the prompt pass, on a static cache: the best of ``repeats``
    rounds of ``steps`` forwards, after a first round (which compiles or captures)."""
    from transformers import StaticCache

    dev, kw = prompt.device, cache_keyword(model)
    m, n = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=n + tokens * steps * (repeats + 1) + 1)
    feed = prompt[:, :tokens]  # what is fed does not change the time of a step
    best = float("inf")
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{kw: cache})
        pos = n
        for r in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                p = torch.arange(pos, pos + tokens, device=dev).expand(m, tokens)
                model(input_ids=feed, position_ids=p, use_cache=True, **{kw: cache})
                pos += tokens
            _sync(dev)
            if r:
                best = min(best, (time.perf_counter() - t0) / steps)
    return best


def step_cost(model, prompt_ids, rows=(1, 2, 4, 8, 16), steps: int = 16, repeats: int = 3,
              progress=lambda s: None) -> dict:
    """ms of one patched decode step (the model's forward, one token per sequence) on a
    static cache of M sequences, per M, and its ratio to M = 1: what the weights' one
    read buys a batch."""
    import tileflow

    report = tileflow.patch(model)
    out = {}
    try:
        for m in rows:
            progress(f"step cost: {m} rows")
            rows_ids = prompt_ids[:1].expand(m, -1).contiguous()
            out[m] = {"step_ms": step_seconds(model, rows_ids, 1, steps, repeats) * 1e3}
        one = out[rows[0]]["step_ms"]
        for m in out:
            out[m]["vs_one_row"] = out[m]["step_ms"] / one
        out["patched_steps"] = report.steps
    finally:
        tileflow.unpatch(model)
    return out


def repeating_prompt(model, ids, new_tokens: int) -> torch.Tensor:
    """``ids`` followed by the model's own greedy continuation: a prompt whose
    continuation repeats what it holds (random-weight models fall into cycles)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return out


def lookup_speculation(model, ids, new_tokens: int, k: int, repeats: int, progress=lambda s: None) -> dict:
    """The patched model's ``generate`` with ``prompt_lookup_num_tokens=k`` against its plain
    greedy ``generate`` on the same prompt: tok/s of each, the speed-up, the mean tokens a
    forward gave (1 + accepted drafts) and whether the tokens are identical."""
    import tileflow

    report = tileflow.patch(model)
    try:
        plain = time_generate(model, ids, new_tokens, repeats, {"do_sample": False}, progress, "lookup: plain")
        lookup = {"do_sample": False, "prompt_lookup_num_tokens": k}
        spec = time_generate(model, ids, new_tokens, repeats, lookup, progress, f"lookup: K={k}")
        # one more call, counted: its first forward is the prompt with drafts, then one a round
        before = (report.steps, report.verify_steps)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, **lookup)
        forwards, verifies = report.steps - before[0], report.verify_steps - before[1]
    finally:
        tileflow.unpatch(model)
    per_forward = new_tokens / (forwards + 1)
    out = {"k": k, "plain_tok_s": plain["decode_tok_s"], "lookup_tok_s": spec["decode_tok_s"],
           "speedup": spec["decode_tok_s"] / plain["decode_tok_s"], "forwards": forwards,
           "verify_steps": verifies, "tokens_identical": plain["tokens"] == spec["tokens"]}
    if forwards:  # counted by the patched program: 1 + the drafts it accepted, a forward
        out.update(tokens_per_forward=per_forward, acceptance=(per_forward - 1) / k)
    else:
        out["note"] = "the patched program did not run (see the report): no acceptance counted"
        out["patch_fallbacks"] = [list(f) for f in report.fallbacks]
    return out


def draft_round(target, draft, ids, k: int, repeats: int = 3, progress=lambda s: None) -> dict:
    """An assistant model's draft round (k one-token patched steps of ``draft``) against the
    target's verify step (k + 1 tokens through the patched program) and its one-token step,
    and the speed-up they imply at acceptance rates 50 / 70 / 90 %: tokens a round
    ``(1 - a**(k+1)) / (1 - a)`` over the round's time ``k * t_draft + t_verify``, against
    ``t_target`` a token."""
    import tileflow

    reports = [tileflow.patch(target), tileflow.patch(draft)]
    try:
        progress("draft model: target step")
        t_target = step_seconds(target, ids, 1, 8, repeats)
        progress("draft model: verify step")
        t_verify = step_seconds(target, ids, k + 1, 4, repeats)
        progress("draft model: draft steps")
        t_draft = step_seconds(draft, ids, 1, 8, repeats)
    finally:
        tileflow.unpatch(target), tileflow.unpatch(draft)
    implied = {}
    for a in (0.5, 0.7, 0.9):
        per_round = (1 - a ** (k + 1)) / (1 - a)
        implied[str(a)] = per_round * t_target / (k * t_draft + t_verify)
    return {"k": k, "target_step_ms": t_target * 1e3, "verify_step_ms": t_verify * 1e3, "draft_step_ms": t_draft * 1e3,
            "draft_round_ms": k * t_draft * 1e3, "implied_speedup": implied,
            "verify_steps_ran": reports[0].verify_steps,
            "note": "random weights give no real acceptance: the speed-ups are implied at the rates named"}


def speculate_spec(text: str) -> tuple[str, int, Optional[str]]:
    """``lookup:K`` or ``draft:K:MODEL``: (kind, K, draft model name)."""
    parts = text.split(":")
    if parts[0] == "lookup" and len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
        return "lookup", int(parts[1]), None
    if parts[0] == "draft" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > 0 and parts[2]:
        return "draft", int(parts[1]), parts[2]
    raise ValueError(f"--speculate {text!r}: lookup:K or draft:K:MODEL (K drafted tokens, at least 1)")
