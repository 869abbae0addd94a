"""The `pallas` attention backend: a Pallas kernel (Triton lowering on a GPU; Pallas' interpreter
elsewhere, for tests) computing each work item's softmax partials over the paged cache, which
merge_item_partials then merges per row, as for the `xla` backend (folojax/ops/paged_attention.py
describes work items). One call serves a step's decode rows and prefill tiles together.

The queries of every row, decode rows' and tiles' alike, lie in one flat buffer per KV head: a
row's query heads of one group side by side (GQA), (group, query) in order, padded to a multiple
of QUERY_BLOCK slots (padding queries have position -1). Each work item knows where its row's
slots start, how many blocks of queries they make and how many cache blocks it covers. One
program per (work item, KV head, block of queries):
- it loads its queries and reads the item's first key position and block ids;
- it walks the item's blocks in place through their ids (no gathered copy), only as far as the
  furthest of its queries reaches, with an online softmax: a running max, sum and weighted
  values, rescaled as each block raises the max; each block of keys and values is loaded once
  for all of the group's query heads;
- it writes the item's max, sum and values for its queries (a program past its row's query
  blocks, a decode row's beside a tile's, does nothing).

Triton's limits shape it: every block it computes on has power-of-two sides and its matrix
products need sides of at least 16, so QUERY_BLOCK is 16, and head_dim and block_size must be
powers of two from 16 to 256 (`unsupported`; attention_backends checks them where the engine
starts). Scores and the softmax are float32; a float32 cache's products run at full float32
precision (not TF32).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from folojax.ops.paged_attention import (
    MASKED_SCORE,
    AttentionRows,
    grouped_queries,
    merge_item_partials,
)

MIN_SIDE, MAX_SIDE = 16, 256  # head_dim and block_size: powers of two in this range
QUERY_BLOCK = 16  # queries per program


def unsupported(head_dim: int, block_size: int) -> str | None:
    """Why the kernel cannot serve these sizes, or None."""
    for name, size in (("head_dim", head_dim), ("block_size", block_size)):
        if size & (size - 1) or not MIN_SIDE <= size <= MAX_SIDE:
            return (f"{name} {size} is not a power of two from {MIN_SIDE} to {MAX_SIDE} (the "
                    "sides of Triton's blocks and matrix products)")
    return None


def _item_kernel(query_offsets_ref, query_blocks_ref, num_blocks_ref, blocks_ref, starts_ref,
                 q_ref, positions_ref, k_ref, v_ref, max_ref, sum_ref, values_ref, *,
                 block_size: int, precision):
    item, head, query_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(query_block < query_blocks_ref[item])
    def _():
        first = query_offsets_ref[item] + query_block * QUERY_BLOCK
        q = q_ref[head, pl.ds(first, QUERY_BLOCK), :]  # [QUERY_BLOCK, head_dim], scaled
        positions = positions_ref[pl.ds(first, QUERY_BLOCK)]  # (-1 = padding)
        start = starts_ref[item]
        # The blocks the furthest query reaches (none for a padding item, which starts past
        # every position).
        reach = jnp.max(positions) - start + 1
        num_blocks = jnp.clip((reach + block_size - 1) // block_size, 0, num_blocks_ref[item])
        key_offsets = jax.lax.iota(jnp.int32, block_size)[None, :]  # a 1-D range, as Triton's

        def attend_block(b, carry):
            running_max, running_sum, acc = carry
            block = blocks_ref[item, b]
            k = k_ref[block, head, :, :]  # [block_size, head_dim]
            v = v_ref[block, head, :, :]
            scores = jax.lax.dot_general(q.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32,
                                         precision=precision)
            visible = start + b * block_size + key_offsets <= positions[:, None]
            scores = jnp.where(visible, scores, MASKED_SCORE)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
            probs = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
            rescale = jnp.exp(running_max - new_max)
            acc = acc * rescale[:, None] + jax.lax.dot_general(
                probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32, precision=precision)
            return new_max, running_sum * rescale + jnp.sum(probs, axis=1), acc

        init = (jnp.full((QUERY_BLOCK,), MASKED_SCORE, jnp.float32),
                jnp.zeros((QUERY_BLOCK,), jnp.float32),
                jnp.zeros((QUERY_BLOCK, q.shape[-1]), jnp.float32))
        running_max, running_sum, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
        slots = pl.ds(query_block * QUERY_BLOCK, QUERY_BLOCK)
        max_ref[item, head, slots] = running_max
        sum_ref[item, head, slots] = running_sum
        values_ref[item, head, slots, :] = acc


def _slots(queries: int) -> int:
    return -(-queries // QUERY_BLOCK) * QUERY_BLOCK


def _in_call(part: AttentionRows) -> bool:
    """Whether the part has rows and work items (else its output is zeros, with no call)."""
    return bool(part.q.shape[0] and part.items.rows.shape[0])


def pallas_step_attention(k_cache: jax.Array, v_cache: jax.Array, parts: tuple[AttentionRows, ...],
                          interpret: bool = False) -> tuple[jax.Array, ...]:
    """Paged attention of several sets of rows (a step's decode rows and prefill tiles) in one
    kernel call (`interpret`: Pallas' interpreter, on any platform); each part's output
    [rows, q_len, num_heads, head_dim], in order."""
    num_kv_heads, block_size, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    reason = unsupported(head_dim, block_size)
    if reason is not None:
        raise ValueError(f"the pallas attention backend cannot serve this cache: {reason}")
    live = [part for part in parts if _in_call(part)]
    if not live:
        return tuple(jnp.zeros(part.q.shape, v_cache.dtype) for part in parts)
    queries, positions, offsets, query_blocks, num_blocks, blocks, starts = ([] for _ in range(7))
    base, most_slots = 0, 0
    width = max(part.items.blocks.shape[1] for part in live)
    for part in live:
        grouped, part_positions = grouped_queries(part.q, part.positions, num_kv_heads)
        rows, _, count, _ = grouped.shape
        slots = _slots(count)
        most_slots = max(most_slots, slots)
        grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, slots - count), (0, 0)))
        queries.append(grouped.transpose(1, 0, 2, 3).reshape(num_kv_heads, rows * slots,
                                                              head_dim))
        positions.append(jnp.pad(part_positions, ((0, 0), (0, slots - count)),
                                 constant_values=-1).reshape(-1))
        items = part.items
        num_items, per_item = items.blocks.shape
        offsets.append(base + items.rows.astype(jnp.int32) * slots)
        query_blocks.append(jnp.full(num_items, slots // QUERY_BLOCK, jnp.int32))
        num_blocks.append(jnp.full(num_items, per_item, jnp.int32))
        blocks.append(jnp.pad(items.blocks.astype(jnp.int32), ((0, 0), (0, width - per_item))))
        starts.append(items.starts.astype(jnp.int32))
        base += rows * slots
    precision = (jax.lax.Precision.HIGHEST if k_cache.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    total_items = sum(part.items.rows.shape[0] for part in live)
    shape = (total_items, num_kv_heads, most_slots)
    maxima, sums, values = pl.pallas_call(
        functools.partial(_item_kernel, block_size=block_size, precision=precision),
        grid=(total_items, num_kv_heads, most_slots // QUERY_BLOCK),
        out_shape=(jax.ShapeDtypeStruct(shape, jnp.float32),
                   jax.ShapeDtypeStruct(shape, jnp.float32),
                   jax.ShapeDtypeStruct((*shape, head_dim), jnp.float32)),
        interpret=interpret,
    )(*(jnp.concatenate(a) for a in (offsets, query_blocks, num_blocks, blocks, starts)),
      jnp.concatenate(queries, axis=1), jnp.concatenate(positions), k_cache, v_cache)
    outputs, first = [], 0
    for part in parts:
        if not _in_call(part):
            outputs.append(jnp.zeros(part.q.shape, v_cache.dtype))
            continue
        rows, q_len, num_heads, _ = part.q.shape
        count, num_items = q_len * (num_heads // num_kv_heads), part.items.rows.shape[0]
        mine = slice(first, first + num_items)
        outputs.append(merge_item_partials(
            maxima[mine, :, :count], sums[mine, :, :count], values[mine, :, :count],
            part.items.rows, rows, q_len, num_heads, v_cache.dtype))
        first += num_items
    return tuple(outputs)


def pallas_paged_attention(q, k_cache, v_cache, items, query_positions,
                           items_per_iteration: int = 0, interpret: bool = False) -> jax.Array:
    """Paged attention of one set of rows by the Pallas kernel (see pallas_step_attention)."""
    del items_per_iteration  # every item is a program
    return pallas_step_attention(k_cache, v_cache,
                                 (AttentionRows(q, items, query_positions),),
                                 interpret=interpret)[0]
