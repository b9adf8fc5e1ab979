"""Pattern ``gqa_attention``: one decode query attending over ``concat(past, new)``
keys / values with the K/V heads repeated per group (``repeat_kv``), softmax of
``(q*s) @ (k*s)^T + causal_mask`` and the product with V.

Replaced by ``gqa_attention`` (ONNX Runtime: ``GroupQueryAttention``;
opset 23: ``Attention`` with past / present) when, exactly:
- batch 1 and one query (decode): the causal mask of a query at the last position
  admits every key, so it is dropped; the mask must be ``kv_index <= past_len`` built
  from the cache length, the fully-masked-row guard ``where(isnan(p), 0, p)`` is then
  a no-op,
- the cache tensors are graph inputs [1, kv_heads, past, head_dim], the new k / v are
  [1, kv_heads, 1, head_dim], heads are a multiple of kv heads and the repeat is
  kv head j -> heads j*G .. j*G+G-1,
- the two scale factors are one constant ``s`` (the fused scale is ``s*s``),
- the output is reshaped to [1, 1, heads * head_dim].
Prefill (many queries, a real causal mask) keeps the original.

In the torch backend (dynamo graph, ``integrations/torch/decode_graph.py``) the same
pattern is SDPA over repeat_kv of the static cache (or the cache itself: MHA, G = 1),
the cache written once by ``index_copy_`` before it is read, and a bool mask whose terms
are the causal ``arange(R) + offset >= arange(S)`` (then row i reads rows
``< offset + i + 1``) and any ``[1 or B, 1, 1, S]`` rows (the padding term, or the mask
``generate`` passes in for one query a sequence), which become the kernel's per-row key
mask: for queries of one sequence such a row is exactly a per-key mask. Matched for
B sequences of R new tokens each (R <= ``MAX_ROWS``: a verify step; more is a prefill),
the q/k/v rows ``[B, R]`` and position_ids ``[B or 1, R]``, every sequence written at
the same cache rows (transformers' cache_position). A mask built outside the graph for
R > 1 rows ``[B or 1, 1, R, S]`` is taken as its last row (key mask) with the kernel's
causal rows, and the step checks that this is the mask (``tileflow::row_mask_keys``: a
mask of another form raises, never a silent difference). A float (additive) mask, dropout or ``is_causal`` keep the
original.
"""

NAME = "gqa_attention"
SUITE_KERNEL = "gqa_attention"
# new tokens a sequence a step at most: a speculative verify's; more is a prefill, whose
# R x G query rows would not fit one tile of the kernel
MAX_ROWS = 16
