"""The `pallas` attention backend: a Pallas kernel (Triton lowering on a GPU; Pallas' interpreter
elsewhere, for tests) computing each work item's softmax partials over the paged cache, which
merge_item_partials then merges per row, as for the `xla` backend (folojax/ops/paged_attention.py
describes work items).

One program per (work item, KV head, block of queries):
- it reads the item's row, first key position and blocks from the work items, and the row's
  queries of that KV head: every query head of the group side by side (GQA), so each block of
  keys and values is loaded once for the whole group;
- it walks the item's blocks in place through their block ids (no gathered copy), only as far
  as the row's furthest query reaches, with an online softmax: a running max, sum and weighted
  values, rescaled as each block raises the max;
- it writes the item's max, sum and values for its queries.

Triton's limits shape it: every block it computes on has power-of-two sides and its matrix
products need sides of at least 16, so queries (group x query) pad to a power of two of at least
16 (padding queries have position -1), and head_dim and block_size must be powers of two from 16
to 256 (LIMITS; attention_backends checks them where the engine starts). Scores and the softmax
are float32; a float32 cache's products run at full float32 precision (not TF32).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from folojax.ops.paged_attention import (
    MASKED_SCORE,
    WorkItems,
    grouped_queries,
    merge_item_partials,
)

MIN_SIDE, MAX_SIDE = 16, 256  # head_dim and block_size: powers of two in this range
QUERY_BLOCK = 64  # queries per program, at most


def unsupported(head_dim: int, block_size: int) -> str | None:
    """Why the kernel cannot serve these sizes, or None."""
    for name, size in (("head_dim", head_dim), ("block_size", block_size)):
        if size & (size - 1) or not MIN_SIDE <= size <= MAX_SIDE:
            return (f"{name} {size} is not a power of two from {MIN_SIDE} to {MAX_SIDE} (the "
                    "sides of Triton's blocks and matrix products)")
    return None


def _padded_queries(queries: int) -> int:
    return max(MIN_SIDE, 1 << (queries - 1).bit_length())


def _item_kernel(rows_ref, blocks_ref, starts_ref, q_ref, positions_ref, k_ref, v_ref,
                 max_ref, sum_ref, values_ref, *, blocks_per_item: int, block_size: int,
                 query_block: int, precision):
    item, head, query_block_index = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    queries = pl.ds(query_block_index * query_block, query_block)
    row, start = rows_ref[item], starts_ref[item]
    q = q_ref[row, head, queries, :]  # [query_block, head_dim], scaled, float32
    positions = positions_ref[row, queries]  # [query_block] (-1 = padding)
    # The blocks the row's furthest query reaches (none for a padding item, which starts past
    # every position).
    reach = jnp.max(positions) - start + 1
    num_blocks = jnp.clip((reach + block_size - 1) // block_size, 0, blocks_per_item)
    key_offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

    def attend_block(b, carry):
        running_max, running_sum, acc = carry
        block = blocks_ref[item, b]
        k = k_ref[block, head, :, :]  # [block_size, head_dim]
        v = v_ref[block, head, :, :]
        scores = jax.lax.dot_general(q.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
        visible = start + b * block_size + key_offsets <= positions[:, None]
        scores = jnp.where(visible, scores, MASKED_SCORE)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        probs = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        acc = acc * rescale[:, None] + jax.lax.dot_general(
            probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=precision)
        return new_max, running_sum * rescale + jnp.sum(probs, axis=1), acc

    init = (jnp.full((query_block,), MASKED_SCORE, jnp.float32),
            jnp.zeros((query_block,), jnp.float32),
            jnp.zeros((query_block, q.shape[-1]), jnp.float32))
    running_max, running_sum, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
    max_ref[item, head, queries] = running_max
    sum_ref[item, head, queries] = running_sum
    values_ref[item, head, queries, :] = acc


@functools.partial(jax.jit, static_argnames=("items_per_iteration", "interpret"))
def pallas_paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: jax.Array,
    items: WorkItems,
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    items_per_iteration: int = 0,
    interpret: bool = False,
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    """Paged attention by the Pallas kernel (`interpret`: Pallas' interpreter, on any
    platform). Every work item is one program per KV head and block of queries."""
    del items_per_iteration  # every item is a program
    rows, q_len, num_heads, head_dim = q.shape
    if rows == 0:
        return jnp.zeros(q.shape, v_cache.dtype)
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    reason = unsupported(head_dim, block_size)
    if reason is not None:
        raise ValueError(f"the pallas attention backend cannot serve this cache: {reason}")
    num_items, blocks_per_item = items.blocks.shape
    grouped, positions = grouped_queries(q, query_positions, num_kv_heads)
    queries = grouped.shape[2]
    padded = _padded_queries(queries)
    query_block = min(padded, QUERY_BLOCK)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, padded - queries), (0, 0)))
    positions = jnp.pad(positions, ((0, 0), (0, padded - queries)), constant_values=-1)
    precision = (jax.lax.Precision.HIGHEST if k_cache.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    kernel = functools.partial(_item_kernel, blocks_per_item=blocks_per_item,
                               block_size=block_size, query_block=query_block,
                               precision=precision)
    shape = (num_items, num_kv_heads, padded)
    maxima, sums, values = pl.pallas_call(
        kernel,
        grid=(num_items, num_kv_heads, padded // query_block),
        out_shape=(jax.ShapeDtypeStruct(shape, jnp.float32),
                   jax.ShapeDtypeStruct(shape, jnp.float32),
                   jax.ShapeDtypeStruct((*shape, head_dim), jnp.float32)),
        interpret=interpret,
    )(items.rows.astype(jnp.int32), items.blocks.astype(jnp.int32),
      items.starts.astype(jnp.int32), grouped, positions.astype(jnp.int32), k_cache, v_cache)
    return merge_item_partials(maxima[..., :queries], sums[..., :queries],
                               values[..., :queries, :], items.rows, rows, q_len, num_heads,
                               v_cache.dtype)
