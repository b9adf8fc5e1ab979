"""The captured CUDA graphs of the patch path's decode and prompt programs, keyed by the
addresses of every tensor of the cache they write (plus what else the capture depends
on), least recently used first out.

generate makes a new static cache every call; once the old one is freed the allocator
mostly hands the new one the same blocks, and a graph captured on the old tensors is
then exact for the new cache: keyed by addresses, it is replayed instead of captured
again (a capture costs tens of milliseconds, a tenth of a 256-token decode)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional


class GraphTable:
    """At most ``max_graphs`` entries, each ``(weakref to its cache, *captured state)``.

    A key holds the addresses of all the cache's tensors (``cache_addresses``): an entry
    is replayed for the cache it was captured on, or for another cache at the very same
    addresses once that one is gone; an entry whose cache is still alive but is not the
    cache in hand is dropped, never replayed."""

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.entries: OrderedDict[Hashable, tuple] = OrderedDict()

    def get(self, key: Hashable, cache: Any) -> Optional[tuple]:
        """The entry for ``key`` captured on this very ``cache``, else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        owner = entry[0]()
        if owner is not cache and owner is not None:  # two live caches cannot share addresses
            del self.entries[key]
            return None
        if owner is None:
            self.entries[key] = entry = (weakref.ref(cache), *entry[1:])
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


def cache_addresses(cache) -> tuple:
    """The address and shape of every tensor of a static cache a program reads or writes
    (keys, values and the device-side count of each layer)."""
    out = []
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        out.append((layer.keys.data_ptr(), layer.values.data_ptr(), tuple(layer.keys.shape),
                    counter.data_ptr() if hasattr(counter, "data_ptr") else None))
    return tuple(out)


class AddressMemo:
    """``cache_addresses`` of the cache last seen, recomputed only for another cache (or
    one re-initialised): a step costs an identity check, not a walk over the layers."""

    def __init__(self):
        self._cache, self._first, self._key = None, None, None

    def __call__(self, cache) -> tuple:
        first = cache.layers[0].keys.data_ptr()
        if self._cache is None or self._cache() is not cache or self._first != first:
            self._cache, self._first, self._key = weakref.ref(cache), first, cache_addresses(cache)
        return self._key
