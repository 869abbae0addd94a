"""Shape buckets: lengths and batch sizes padded to powers of two, so jit compiles a handful of
times rather than once per shape."""


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum`."""
    size = minimum
    while size < n:
        size *= 2
    return size if maximum is None else min(size, maximum)


def stepped_bucket(n: int, step: int, linear_steps: int = 8) -> int:
    """n rounded up to a multiple of `step` up to linear_steps * step (little padding where most
    steps fall), then to step times a power of two (few shapes for the rare large ones):
    for step 8: 0, 8, 16, ..., 64, 128, 256, ..."""
    steps = -(-n // step)
    return step * (steps if steps <= linear_steps else bucket(steps, linear_steps))
