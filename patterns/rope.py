"""Pattern ``rope``: ``x * cos + rotate_half(x) * sin`` (transformers'
``apply_rotary_pos_emb``) with ``cos, sin = cos / sin(concat(f, f))`` and
``f = float(position) * inv_freq``.

Replaced by ``rope`` (ONNX: ``RotaryEmbedding``, non-interleaved, with tables
``cos(p * inv_freq)``, ``sin(p * inv_freq)`` for ``p < max_positions``) when, exactly:
- ``x`` is 4-D [batch 1, heads, seq, head_dim] float32 with a static, even head_dim,
- ``inv_freq`` is a constant of head_dim / 2 entries (any rope_type: the tables are
  computed from the graph's own ``inv_freq``, so theta and llama3 scaling carry over;
  an ``attention_scaling`` factor other than 1 adds a Mul the pattern does not contain),
- ``rotate_half`` slices exactly ``[:d/2]`` and ``[d/2:]`` of the last axis and
  concatenates ``(-second, first)``; cos / sin broadcast over the head axis,
- positions are int64 [1, seq, 1].

The torch backend fuses it into ``qkv_rope_cache`` with ``ROPE_KIND`` 3 (frequencies read
from the graph's ``inv_freq``, widened to fp32 as the graph widens them) under the same
conditions, both ``f`` forms transformers has used (``pos[..., None] * inv_freq`` and
``(inv_freq[None, :, None] @ pos[:, None, :]).transpose(1, 2)``), one decode row.
"""

NAME = "rope"
SUITE_KERNEL = "rope_q"  # rope_k where the rotated tensor is a key bound for the cache
