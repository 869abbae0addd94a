"""Shape buckets: pad lengths and batch sizes to powers of two so jit compiles a handful of times."""


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum`."""
    size = minimum
    while size < n:
        size *= 2
    return size if maximum is None else min(size, maximum)
