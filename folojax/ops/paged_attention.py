"""Attention over the paged cache, for decode rows and prefill tiles alike.

Each row is a run of consecutive queries of one request (a decode row has one; a prefill tile up
to 64) with that request's block table. A row walks its blocks a chunk at a time with an online
softmax (flash-decoding), so the keys it reads stay in the CPU's caches instead of being gathered
into one big copy first, and no row attends to another request's keys. Measured on this CPU
(Qwen3-small shapes): 48 decode rows of ~300 tokens 6x faster than gather-then-attend, and a
1024-token prefill of four prompts 12x faster than one dense masked attention over all of them.
The loop (trip count traced, so no recompile per length) also beat the same ops unrolled: XLA's
CPU backend fuses a gather into the following dot far less well outside a loop body.

Keys per iteration (ChunkSizes) depend on the backend. On CPU, small chunks suit decode rows
(little work per key, and small intermediates stay in cache: 32 keys ran 1.4-1.9x faster than
128) and larger ones prefill tiles (64 queries per key: 64 keys ran ~2x faster than 16). On a
GPU every iteration launches its own kernels, so a few large chunks are better.

A query sees the keys at positions <= its own; a padding query has position -1 and sees none.
"""

import dataclasses

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a query that sees no key gets zeros, not NaN


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
    """Keys per attention iteration, for decode rows and for prefill tiles."""

    decode: int
    prefill: int


def default_chunk_sizes(backend: str | None = None) -> ChunkSizes:
    """The chunk sizes for a backend (default: JAX's default backend)."""
    return (ChunkSizes(decode=32, prefill=64) if (backend or jax.default_backend()) == "cpu"
            else ChunkSizes(decode=512, prefill=512))


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
        probs = jnp.exp(scores - new_max[..., None])
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
