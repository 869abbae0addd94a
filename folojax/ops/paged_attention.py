"""Attention over the paged cache, for decode rows (one query each) and prefill tiles (up to 64
consecutive queries of one request), as work items: the backends' shared form
(folojax/ops/attention_backends.py chooses one; this module has the `xla` and `cpu` ones).

A work item is one chunk of one row's keys (consecutive whole blocks of its block table), built
on the host: a row gets the items its furthest query reaches, so a short row costs its own keys
rather than the longest row's, and a prefill tile reads only the chunks its causal mask reaches
(flash-decoding's split-K). Each item's softmax partials (max, sum, weighted values) are merged
per row at the end (merge_item_partials).

`xla`: a loop walks the items a fixed number at a time, each gathering its blocks and computing
its partials. The loop's trip count is traced, so lengths do not recompile, and on CPU a loop
body keeps each iteration's keys in the caches; XLA's CPU backend also fuses a gather into the
following dot far less well outside a loop body.

Keys per item and items per iteration (ChunkSizes) depend on the backend and platform. On CPU:
64-key items, 16 per iteration (64 queries per key in a prefill tile). On a GPU every iteration
launches its own kernels, so a few large iterations are better.

`cpu` (float32 caches): a C++ kernel (csrc/paged_attention.cc, through XLA's FFI) walks each
row's blocks in place, with no gathered copy. examples/attention_microbench.py compares the
backends; docs/BENCHMARKS.md has figures.

A query sees the keys at positions <= its own; a padding query has position -1, sees none and
gets zeros.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from folojax.ops import cpu_kernels

MASKED_SCORE = -1e30  # finite, so a fully masked max stays finite (no NaN from inf - inf)


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
    """Keys per work item and items per loop iteration, for decode rows and prefill tiles."""

    decode: int
    decode_items: int
    prefill: int
    prefill_items: int
    backend: str = "xla"  # the attention backend's name (folojax/ops/attention_backends.py)
    # Work items pad to this many times a power of two (0: 4 x items per iteration). The C++
    # kernel skips padding items at no cost, so a large bucket there saves recompiles as
    # contexts grow; the gather loop keeps partials for every item, so it stays small.
    min_work_items: int = 0

    def work_items_bucket(self, items_per_iteration: int) -> int:
        return self.min_work_items or 4 * items_per_iteration


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WorkItems:
    """Attention work items: one chunk of one row's keys each (built on the host)."""

    rows: jax.Array  # [items]: the row (decode row or prefill tile) it belongs to; padding: 0
    blocks: jax.Array  # [items, blocks per item]: the chunk's consecutive blocks
    starts: jax.Array  # [items]: position of the chunk's first key (padding: past all)
    num_iterations: jax.Array  # []: ceil(real items / items per iteration) (traced)


# Chunk sizes of the work-item backends per platform (the backend's name is set by its entry).
CPU_CHUNKS = ChunkSizes(decode=64, decode_items=16, prefill=64, prefill_items=16)
# The C++ kernel skips padding items at no cost: a large bucket saves recompiles as contexts grow.
CPU_KERNEL_CHUNKS = dataclasses.replace(CPU_CHUNKS, backend="cpu", min_work_items=256)
ACCELERATOR_CHUNKS = ChunkSizes(decode=512, decode_items=256, prefill=512, prefill_items=128)


class AttentionRows(NamedTuple):
    """One set of rows of queries that attend through work items: a step's decode rows (q_len
    1) or its prefill tiles."""

    q: jax.Array  # [rows, q_len, num_heads, head_dim]
    items: WorkItems
    positions: jax.Array  # [rows, q_len] (-1 = padding)
    items_per_iteration: int = 0  # ChunkSizes' (the xla loop's stride)


def chunk_blocks(block_size: int, chunk_tokens: int) -> int:
    """Blocks per work item."""
    return max(1, chunk_tokens // block_size)


def xla_paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]: a decode row (q_len 1) or prefill tile
    k_cache: jax.Array,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: jax.Array,
    items: WorkItems,
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    items_per_iteration: int,
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    """Attention split into work items (flash-decoding's split-K), by XLA: a loop gathers
    `items_per_iteration` items' blocks at a time and computes their softmax partials."""
    rows, q_len, num_heads, head_dim = q.shape
    if rows == 0:
        return jnp.zeros(q.shape, v_cache.dtype)
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    num_items, blocks_per_item = items.blocks.shape
    item_keys = blocks_per_item * block_size
    q, positions = grouped_queries(q, query_positions, num_kv_heads)
    queries = q.shape[2]

    def attend_items(index, partials):
        def this(array):
            return jax.lax.dynamic_slice_in_dim(array, index * items_per_iteration,
                                                items_per_iteration)

        item_rows = this(items.rows)
        blocks = this(items.blocks)
        # [items, blocks per item, kv_heads, block_size, head_dim]: one slab per block.
        k = jnp.take(k_cache, blocks, axis=0, mode="clip")
        v = jnp.take(v_cache, blocks, axis=0, mode="clip")
        scores = jnp.einsum("ihqd,ibhkd->ihqbk", jnp.take(q, item_rows, axis=0), k,
                            preferred_element_type=jnp.float32).reshape(
            items_per_iteration, num_kv_heads, queries, item_keys)
        key_positions = this(items.starts)[:, None] + jnp.arange(item_keys)  # [items, keys]
        visible = (key_positions[:, None, :] <= positions[item_rows][:, :, None])[:, None]
        scores = jnp.where(visible, scores, MASKED_SCORE)
        maxima = scores.max(axis=-1)
        probs = jnp.where(visible, jnp.exp(scores - maxima[..., None]), 0.0)
        values = jnp.einsum("ihqbk,ibhkd->ihqd", probs.astype(v.dtype).reshape(
            items_per_iteration, num_kv_heads, queries, blocks_per_item, block_size), v,
            preferred_element_type=jnp.float32)
        start = index * items_per_iteration
        return tuple(jax.lax.dynamic_update_slice_in_dim(whole, part, start, axis=0)
                     for whole, part in zip(partials, (maxima, probs.sum(axis=-1), values),
                                            strict=True))

    shape = (num_items, num_kv_heads, queries)
    init = (jnp.full(shape, MASKED_SCORE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    maxima, sums, values = jax.lax.fori_loop(0, items.num_iterations, attend_items, init)
    return merge_item_partials(maxima, sums, values, items.rows, q.shape[0], q_len, num_heads,
                               v_cache.dtype)


def grouped_queries(q: jax.Array, query_positions: jax.Array, num_kv_heads: int
                    ) -> tuple[jax.Array, jax.Array]:
    """Queries [rows, q_len, heads, head_dim] as [rows, kv_heads, (group, query), head_dim] in
    float32, scaled by 1 / sqrt(head_dim): a KV head's queries side by side (GQA), and their
    positions [rows, (group, query)]."""
    rows, q_len, num_heads, head_dim = q.shape
    groups = num_heads // num_kv_heads
    q = q.reshape(rows, q_len, num_kv_heads, groups, head_dim).astype(jnp.float32)
    q = (q * head_dim**-0.5).transpose(0, 2, 3, 1, 4).reshape(
        rows, num_kv_heads, groups * q_len, head_dim)
    return q, jnp.tile(query_positions, (1, groups))


def merge_item_partials(maxima, sums, values, item_rows, rows: int, q_len: int, num_heads: int,
                        dtype) -> jax.Array:
    """Each row's items merged, weighted by exp(item max - row max); masked keys add nothing.
    maxima and sums [items, kv_heads, (group, query)], values [..., head_dim] -> the attention
    output [rows, q_len, num_heads, head_dim] (rows without items: zeros)."""
    num_kv_heads, head_dim = values.shape[1], values.shape[-1]
    groups = num_heads // num_kv_heads
    row_max = jax.ops.segment_max(maxima, item_rows, num_segments=rows)
    weights = jnp.exp(maxima - row_max[item_rows])
    denominator = jax.ops.segment_sum(sums * weights, item_rows, num_segments=rows)
    numerator = jax.ops.segment_sum(values * weights[..., None], item_rows, num_segments=rows)
    out = numerator / jnp.maximum(denominator, 1e-30)[..., None]  # rows without items: 0
    out = out.reshape(rows, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(rows, q_len, num_heads, head_dim).astype(dtype)


NATIVE_MAX_HEAD_DIM, NATIVE_MAX_BLOCK_SIZE = 512, 256  # the C++ kernel's stack buffers


def native_paged_attention(q, k_cache, v_cache, items: WorkItems, query_positions,
                           items_per_iteration: int = 0):
    """The same attention by the C++ kernel (folojax/ops/csrc/paged_attention.cc): each row's
    queries walk its blocks in place, with no gathered copy. float32 caches only (its limits are
    checked where the engine starts: attention_backends.check_backend)."""
    del items_per_iteration  # the kernel walks every item
    if k_cache.dtype != jnp.float32 or v_cache.dtype != jnp.float32:
        raise TypeError(f"the CPU paged-attention kernel reads float32 caches, got "
                        f"{k_cache.dtype}/{v_cache.dtype}")
    head_dim, block_size = q.shape[-1], k_cache.shape[2]
    if head_dim > NATIVE_MAX_HEAD_DIM or block_size > NATIVE_MAX_BLOCK_SIZE:
        raise ValueError(f"the CPU paged-attention kernel takes head_dim <= "
                         f"{NATIVE_MAX_HEAD_DIM} and block_size <= {NATIVE_MAX_BLOCK_SIZE}, got "
                         f"{head_dim} and {block_size}")
    if not cpu_kernels.load():
        raise RuntimeError("the CPU paged-attention kernel is not available (see the warning "
                           "logged by folojax.ops.cpu_kernels); use attention_backend='xla'")
    if q.shape[0] == 0:
        return jnp.zeros(q.shape, v_cache.dtype)
    call = jax.ffi.ffi_call(cpu_kernels.PAGED_ATTENTION_TARGET,
                            jax.ShapeDtypeStruct(q.shape, jnp.float32))
    int32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return call(q.astype(jnp.float32), k_cache, v_cache, int32(items.rows), int32(items.blocks),
                int32(items.starts), int32(query_positions))
