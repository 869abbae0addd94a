"""Shape buckets: lengths and batch sizes padded to powers of two, so jit compiles a handful of
times rather than once per shape."""


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum`."""
    size = minimum
    while size < n:
        size *= 2
    return size if maximum is None else min(size, maximum)
