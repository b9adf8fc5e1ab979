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


def test_a_new_cache_under_a_reused_key_is_not_given_the_old_graph():
    table = GraphTable(2)
    old = Cache()
    table.put("k", old, lambda: ("old graph",))
    new = Cache()  # e.g. the same id and buffer address once the old cache is freed
    assert table.get("k", new) is None and len(table) == 0
    del old
    gc.collect()
    assert table.get("k", Cache()) is None


def test_least_recently_used_is_evicted_first():
    table, caches = GraphTable(2), [Cache() for _ in range(3)]
    table.put("a", caches[0], lambda: ("a",))
    table.put("b", caches[1], lambda: ("b",))
    assert table.get("a", caches[0])  # "a" used last: "b" goes
    table.put("c", caches[2], lambda: ("c",))
    assert table.get("b", caches[1]) is None
    assert table.get("a", caches[0])[1] == "a" and table.get("c", caches[2])[1] == "c"
