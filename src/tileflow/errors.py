"""The errors tileflow raises for a user's misuse (docs/misuse.md lists what each says)."""


class CacheFullError(IndexError):
    """A decode step would write past the end of a static cache (an IndexError, as the
    model's own ``index_copy_`` raises on CPU)."""


def cache_full_message(filled: int, capacity: int) -> str:
    return (f"tileflow: the static cache is full ({filled} of max_cache_len={capacity} rows filled): "
            f"a decode step would write row {filled}; give the cache a larger max_cache_len "
            f"(or ask generate for fewer new tokens)")
