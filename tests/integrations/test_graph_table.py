"""The patch path's table of captured graphs (no GPU needed: the captured state is any
tuple): a stale entry is never handed out, least recently used goes first."""

import gc

from tileflow.integrations.transformers.graph_table import GraphTable


class Cache:  # weakly referenceable, like transformers' caches
    pass


def test_an_entry_is_kept_for_its_own_cache():
    table, cache = GraphTable(2), Cache()
    captured = []
    entry = table.get("k", cache) or table.put("k", cache, lambda: captured.append(1) or ("graph",))
    assert entry[1:] == ("graph",) and entry[0]() is cache
    assert table.get("k", cache) is entry and captured == [1]


def test_a_live_cache_never_gets_another_live_caches_graph():
    table = GraphTable(2)
    old = Cache()
    table.put("k", old, lambda: ("old graph",))
    assert table.get("k", Cache()) is None and len(table) == 0


def test_a_freed_caches_graph_serves_a_new_cache_at_the_same_addresses():
    # the key holds every tensor address (cache_addresses): equal keys, equal tensors
    table = GraphTable(2)
    old = Cache()
    table.put("k", old, lambda: ("graph",))
    del old
    gc.collect()
    new = Cache()
    entry = table.get("k", new)
    assert entry[1] == "graph" and entry[0]() is new
    assert table.get("k", Cache()) is None  # now owned by the live new cache


def test_the_key_changes_with_any_tensor_of_the_cache():
    import torch
    from transformers import Qwen2Config, StaticCache

    from tileflow.integrations.transformers.graph_table import AddressMemo, cache_addresses

    cfg = Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=64, vocab_size=50)
    cache = StaticCache(config=cfg, max_cache_len=8)
    k = torch.zeros(1, 2, 1, 8)
    for i in range(2):
        cache.update(k, k, i)
    memo, before = AddressMemo(), cache_addresses(cache)
    assert memo(cache) == before
    cache.layers[1].values = cache.layers[1].values.clone()
    assert cache_addresses(cache) != before


def test_least_recently_used_is_evicted_first():
    table, caches = GraphTable(2), [Cache() for _ in range(3)]
    table.put("a", caches[0], lambda: ("a",))
    table.put("b", caches[1], lambda: ("b",))
    assert table.get("a", caches[0])  # "a" used last: "b" goes
    table.put("c", caches[2], lambda: ("c",))
    assert table.get("b", caches[1]) is None
    assert table.get("a", caches[0])[1] == "a" and table.get("c", caches[2])[1] == "c"
