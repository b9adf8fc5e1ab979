"""The captured CUDA graphs of the patch path's decode and prompt programs, keyed by the
cache they write (its ``id`` and first buffer's address, plus what else the capture
depends on), least recently used first out."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional


class GraphTable:
    """At most ``max_graphs`` entries, each ``(weakref to its cache, *captured state)``.

    A key names a cache by ``id`` and buffer address, and both can come back for a new
    cache once the old one is freed: an entry whose weak reference no longer points at
    the cache in hand is dropped, never replayed (its graph would count on the old
    cache's tensors)."""

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.entries: OrderedDict[Hashable, tuple] = OrderedDict()

    def get(self, key: Hashable, cache: Any) -> Optional[tuple]:
        """The entry for ``key`` captured on this very ``cache``, else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0]() is not cache:  # a new cache where a freed one was
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, cache: Any, capture: Callable[[], tuple]) -> tuple:
        """Capture (``capture()`` returns the captured state) and keep it for ``cache``,
        evicting the least recently used entry when full."""
        entry = (weakref.ref(cache), *capture())
        if len(self.entries) >= self.max_graphs:
            self.entries.popitem(last=False)
        self.entries[key] = entry
        return entry

    def __len__(self) -> int:
        return len(self.entries)
