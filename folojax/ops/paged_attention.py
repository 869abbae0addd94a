"""Attention over the paged cache: prefill tiles (`paged_attention`) and decode rows
(`paged_decode_attention`).

A prefill tile is up to 64 consecutive queries of one request with that request's block table.
It walks its blocks a chunk at a time with an online softmax, so the keys it reads stay in the
CPU's caches instead of being gathered into one big copy first, and no tile attends to another
request's keys. Measured on this CPU (Qwen3-small shapes): a 1024-token prefill of four prompts
12x faster than one dense masked attention over all of them. The loop (trip count traced, so no
recompile per length) also beat the same ops unrolled: XLA's CPU backend fuses a gather into the
following dot far less well outside a loop body.

Decode rows (one query each) are split into work items, one chunk of one row's keys each
(flash-decoding's split-K), so a short row costs its own keys rather than the longest row's; the
items' softmax partials are merged per row at the end.

Keys per iteration (ChunkSizes) depend on the backend. On CPU: work items of 64 keys, 16 per
iteration, and prefill chunks of 64 keys (64 queries per key: ~2x faster than 16-key chunks).
On a GPU every iteration launches its own kernels, so a few large iterations are better.

A query sees the keys at positions <= its own; a padding query has position -1, sees none and
gets zeros.
"""

import dataclasses

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked max stays finite (no NaN from inf - inf)


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
    """Keys per work item of decode attention (and items per loop iteration), and keys per
    iteration of prefill tiles."""

    decode: int
    decode_items: int
    prefill: int


def default_chunk_sizes(backend: str | None = None) -> ChunkSizes:
    """The chunk sizes for a backend (default: JAX's default backend)."""
    if (backend or jax.default_backend()) == "cpu":
        return ChunkSizes(decode=64, decode_items=16, prefill=64)
    return ChunkSizes(decode=512, decode_items=256, prefill=512)


def chunk_blocks(block_size: int, chunk_tokens: int) -> int:
    """Blocks per iteration; block tables are padded to a multiple of it."""
    return max(1, chunk_tokens // block_size)


def paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,
    block_tables: jax.Array,  # [rows, blocks]: a multiple of chunk_blocks(block_size, chunk)
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    num_chunks: jax.Array,  # []: iterations covering the furthest query (traced: no recompile)
    chunk_tokens: int,
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    rows, q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[0], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    chunk = chunk_blocks(block_size, chunk_tokens)
    keys_per_chunk = chunk * block_size
    # Queries as [kv_heads, rows, (group, query), head_dim]: the batch dims of both matmuls
    # lead, as in the gathered keys, so XLA copies nothing into place.
    q = q.reshape(rows, q_len, num_kv_heads, groups, head_dim).astype(jnp.float32)
    q = (q * head_dim**-0.5).transpose(2, 0, 3, 1, 4).reshape(
        num_kv_heads, rows, groups * q_len, head_dim)
    positions = jnp.tile(query_positions, (1, groups))  # [rows, (group, query)]

    def attend_chunk(index, carry):
        running_max, denominator, numerator = carry
        block_ids = jax.lax.dynamic_slice_in_dim(block_tables, index * chunk, chunk, axis=1)
        shape = (num_kv_heads, rows, keys_per_chunk, head_dim)
        k = jnp.take(k_cache, block_ids, axis=1, mode="clip").reshape(shape)
        v = jnp.take(v_cache, block_ids, axis=1, mode="clip").reshape(shape)
        scores = jnp.einsum("hrqd,hrkd->hrqk", q, k, preferred_element_type=jnp.float32)
        key_positions = index * keys_per_chunk + jnp.arange(keys_per_chunk)
        visible = key_positions[None, None, :] <= positions[:, :, None]
        scores = jnp.where(visible[None], scores, _MASKED)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.where(visible[None], jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        denominator = denominator * rescale + probs.sum(axis=-1)
        numerator = numerator * rescale[..., None] + jnp.einsum(
            "hrqk,hrkd->hrqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_max, denominator, numerator

    shape = (num_kv_heads, rows, groups * q_len)
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, denominator, numerator = jax.lax.fori_loop(0, num_chunks, attend_chunk, init)
    out = numerator / jnp.maximum(denominator, 1e-30)[..., None]
    out = out.reshape(num_kv_heads, rows, groups, q_len, head_dim).transpose(1, 3, 0, 2, 4)
    return out.reshape(rows, q_len, num_heads, head_dim).astype(v_cache.dtype)


def paged_decode_attention(
    q: jax.Array,  # [rows, num_heads, head_dim]: one query per decode row
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,
    item_rows: jax.Array,  # [items]: the row each work item belongs to (padding items: row 0)
    item_blocks: jax.Array,  # [items, blocks per item]: the item's consecutive blocks
    item_starts: jax.Array,  # [items]: position of the item's first key (padding: past all)
    query_positions: jax.Array,  # [rows] (-1 = padding row)
    num_iterations: jax.Array,  # []: ceil(real items / items_per_iteration) (traced)
    items_per_iteration: int,
) -> jax.Array:  # [rows, num_heads, head_dim]
    """Decode attention split into work items (flash-decoding's split-K): each item is one
    chunk of one row's keys, so rows of different lengths cost what their own keys cost instead
    of all padding to the longest. Each item's softmax partials (max, sum, weighted values) are
    merged per row at the end. Measured on CPU (48 rows of 40-320 tokens): 1.45x faster than
    walking every row's blocks in one loop."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[0], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    num_items, item_keys = item_blocks.shape[0], item_blocks.shape[1] * block_size
    if rows == 0:
        return jnp.zeros(q.shape, v_cache.dtype)
    q = (q.reshape(rows, num_kv_heads, groups, head_dim).astype(jnp.float32) * head_dim**-0.5)
    item_q = q.transpose(1, 0, 2, 3)[:, item_rows]  # [kv_heads, items, groups, head_dim]
    item_positions = query_positions[item_rows]

    def attend_items(index, partials):
        def items(array, axis=0):
            return jax.lax.dynamic_slice_in_dim(array, index * items_per_iteration,
                                                items_per_iteration, axis=axis)

        shape = (num_kv_heads, items_per_iteration, item_keys, head_dim)
        blocks = items(item_blocks)
        k = jnp.take(k_cache, blocks, axis=1, mode="clip").reshape(shape)
        v = jnp.take(v_cache, blocks, axis=1, mode="clip").reshape(shape)
        scores = jnp.einsum("higd,hikd->higk", items(item_q, 1), k,
                            preferred_element_type=jnp.float32)
        key_positions = items(item_starts)[:, None] + jnp.arange(item_keys)
        visible = key_positions <= items(item_positions)[:, None]  # [items, keys]
        scores = jnp.where(visible[None, :, None], scores, _MASKED)
        maxima = scores.max(axis=-1)
        probs = jnp.where(visible[None, :, None], jnp.exp(scores - maxima[..., None]), 0.0)
        values = jnp.einsum("higk,hikd->higd", probs.astype(v.dtype), v,
                            preferred_element_type=jnp.float32)
        start = index * items_per_iteration
        return tuple(jax.lax.dynamic_update_slice_in_dim(whole, part, start, axis=1)
                     for whole, part in zip(partials, (maxima, probs.sum(axis=-1), values),
                                            strict=True))

    shape = (num_kv_heads, num_items, groups)
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    maxima, sums, values = jax.lax.fori_loop(0, num_iterations, attend_items, init)
    # Merge each row's items, weighted by exp(item max - row max); masked keys add nothing.
    row_max = jax.ops.segment_max(maxima.transpose(1, 0, 2), item_rows, num_segments=rows)
    weights = jnp.exp(maxima - row_max.transpose(1, 0, 2)[:, item_rows])
    denominator = jax.ops.segment_sum((sums * weights).transpose(1, 0, 2), item_rows,
                                      num_segments=rows)
    numerator = jax.ops.segment_sum((values * weights[..., None]).transpose(1, 0, 2, 3),
                                    item_rows, num_segments=rows)
    out = numerator / jnp.maximum(denominator, 1e-30)[..., None]  # rows without items: 0
    return out.reshape(rows, num_heads, head_dim).astype(v_cache.dtype)
