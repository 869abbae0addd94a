"""One layer's paged attention at the throughput workload's shapes (Qwen3-small: 4 KV heads x 2
query heads each, head_dim 64, 16-token blocks), per attention backend usable here
(folojax.list_attention_backends(): on CPU the C++ kernel `cpu`, XLA's loop `xla`, the dense
oracle `reference`; on a GPU `pallas` too), each on its own work items; and XLA's loop with
every row padded to the furthest one (what a single chunk loop over all rows costs). Before
each timed call a 96 MB buffer is written, so the cache's blocks come from memory, as in a
serving step (which streams the weights between layers), not from the 32 MB L3.

    python examples/attention_microbench.py

Prints the best and median of interleaved runs, in ms. Used for docs/BENCHMARKS.md.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops.attention_backends import BACKENDS, list_attention_backends, paged_attention
from folojax.ops.step_inputs import PREFILL_TILE
from folojax.runner.prepare import work_items

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, NUM_BLOCKS = 4, 2, 64, 16, 2048
_EVICT = np.zeros(24 << 20, np.float32)  # 96 MB, three times the L3


def timings(functions, repeats=12):
    runs = {name: [] for name in functions}
    for _ in range(repeats + 1):  # the first round compiles
        for name, run in functions.items():
            _EVICT[:] += 1.0
            start = time.perf_counter()
            jax.block_until_ready(run())
            runs[name].append(time.perf_counter() - start)
    for name, seconds in runs.items():
        print(f"{name:55s} best {min(seconds[1:]) * 1e3:6.2f}  median "
              f"{np.median(seconds[1:]) * 1e3:6.2f} ms")


def compare(label, q, positions, tables, prefill: bool, k_cache, v_cache):
    last = positions.max(axis=1)
    functions = {}
    for name in list_attention_backends():
        chunks = BACKENDS[name].chunk_sizes(jax.default_backend())
        keys, per_iteration = ((chunks.prefill, chunks.prefill_items) if prefill
                               else (chunks.decode, chunks.decode_items))
        attend = jax.jit(lambda q, items, positions, name=name, per_iteration=per_iteration:
                         paged_attention(q, k_cache, v_cache, items, positions, per_iteration,
                                         name))
        items = work_items(tables, last, BLOCK, keys, per_iteration,
                           chunks.work_items_bucket(per_iteration))
        functions[f"{label}: {name}"] = (
            lambda attend=attend, items=items: attend(q, items, positions))
        if name == "xla":  # every row walks as many chunks as the furthest (extra keys masked)
            padded_tables = [table + [table[-1]] * 64 for table in tables]
            longest = work_items(padded_tables, np.full_like(last, last.max()), BLOCK, keys,
                                 per_iteration)
            functions[f"{label}: xla, every row up to the furthest row"] = (
                lambda attend=attend, longest=longest: attend(q, longest, positions))
    timings(functions)


def main():
    rng = np.random.default_rng(0)
    shape = (NUM_BLOCKS, KV_HEADS, BLOCK, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    free = list(rng.permutation(NUM_BLOCKS))

    def tables_for(lengths):
        return [[int(free.pop()) for _ in range(-(-int(n) // BLOCK))] for n in lengths]

    # 48 decode rows of 40-320 tokens.
    lengths = rng.integers(40, 320, 48)
    q = jnp.asarray(rng.standard_normal((48, 1, KV_HEADS * GROUPS, HEAD_DIM), np.float32))
    compare("48 decode rows", q, (lengths - 1)[:, None].astype(np.int32), tables_for(lengths),
            False, k_cache, v_cache)

    # Whole prompts of 8 requests (32-256 tokens) as tiles of 64 queries.
    lengths = rng.integers(32, 257, 8)
    tables, tile_tables, tile_positions = tables_for(lengths), [], []
    for table, n in zip(tables, lengths, strict=True):
        for offset in range(0, n, PREFILL_TILE):
            positions = np.full(PREFILL_TILE, -1, np.int32)
            count = min(PREFILL_TILE, n - offset)
            positions[:count] = np.arange(offset, offset + count)
            tile_positions.append(positions)
            tile_tables.append(table)
    q = jnp.asarray(rng.standard_normal(
        (len(tile_tables), PREFILL_TILE, KV_HEADS * GROUPS, HEAD_DIM), np.float32))
    compare(f"{len(tile_tables)} prefill tiles", q, np.stack(tile_positions), tile_tables,
            True, k_cache, v_cache)


if __name__ == "__main__":
    main()
