"""What a patched model checks so that a program built at patch time never runs on a
state it was not built for: weights replaced since, a static cache about to overflow.

Both checks cost no device read per token: weight changes are seen by torch's module
registration hooks and the model's ``_apply``; a cache's fill is counted on the host
from the steps the program itself ran, and read from the device only when unknown or
when the count says the cache is full (a reset outside the forward lowers it)."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from tileflow.errors import CacheFullError, cache_full_message  # noqa: F401  (re-exported)


def filled_rows(cache) -> int:
    """The rows a static cache holds, read from the device (one host sync)."""
    counter = getattr(cache.layers[0], "cumulative_length", None)
    return int(counter) if counter is not None else int(cache.get_seq_length())


class CacheFill:
    """The host's count of the filled rows of the last static cache a program wrote."""

    def __init__(self):
        self._cache: Optional[weakref.ref] = None
        self.count: Optional[int] = None

    def check(self, cache, capacity: int, new_rows: int = 1) -> None:
        """Raise :class:`CacheFullError` if ``new_rows`` more rows do not fit, before anything is written."""
        if self.count is None or self._cache is None or self._cache() is not cache:
            self._cache, self.count = weakref.ref(cache), filled_rows(cache)
        if self.count + new_rows > capacity:
            self.count = filled_rows(cache)  # a reset outside the forward (generate reuses caches) lowers it
            if self.count + new_rows > capacity:
                raise CacheFullError(cache_full_message(self.count, capacity))

    def holds_tokens(self, cache) -> bool:
        """Whether the count, kept for this very ``cache``, says it holds tokens (no device read)."""
        return self.count is not None and self.count > 0 and self._cache is not None and self._cache() is cache

    def advanced(self, n: int = 1) -> None:
        self.count += n

    def set(self, cache, count: int) -> None:
        self._cache, self.count = weakref.ref(cache), count

    def forget(self) -> None:
        """Something other than the program wrote the cache: read the count before the next step."""
        self.count = None


_watches: "weakref.WeakKeyDictionary[torch.nn.Module, WeightWatch]" = weakref.WeakKeyDictionary()
_hooks_installed = False


def _registration_hook(module, name, value):
    if torch.compiler.is_compiling():  # traced, the lookup would guard on the table's size (see test_patch_generate)
        return None
    watch = _watches.get(module)
    if watch is not None:
        watch.changed = True
    return None


class WeightWatch:
    """Set ``changed`` when a parameter or submodule of ``model`` is replaced (a new
    ``nn.Linear`` assigned, ``resize_token_embeddings``) or the model is moved or cast
    (``model.to``, ``.half()``): the programs read the tensors they were built on."""

    def __init__(self, model: torch.nn.Module):
        global _hooks_installed
        self.changed = False
        self.model = weakref.ref(model)
        if not _hooks_installed:  # process-wide hooks: one dictionary lookup per registration
            from torch.nn.modules import module as nn_module

            nn_module.register_module_parameter_registration_hook(_registration_hook)
            nn_module.register_module_module_registration_hook(_registration_hook)
            nn_module.register_module_buffer_registration_hook(_registration_hook)
            _hooks_installed = True
        for m in model.modules():
            _watches[m] = self
        cls_apply = type(model)._apply

        def _apply(*args, **kwargs):  # model.to / cuda / half / float all pass through the root's _apply
            self.changed = True
            return cls_apply(model, *args, **kwargs)

        model._apply = _apply

    def release(self) -> None:
        model = self.model()
        if model is None:
            return
        for m in model.modules():
            if _watches.get(m) is self:
                del _watches[m]
        model.__dict__.pop("_apply", None)
