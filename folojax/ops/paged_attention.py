"""Attention over the paged cache, for decode rows and prefill tiles alike.

Each row is a run of consecutive queries of one request (a decode row has one; a prefill tile up
to 64) with that request's block table. A row walks its blocks a chunk at a time with an online
softmax (flash-decoding), so the keys it reads stay in the CPU's caches instead of being gathered
into one big copy first, and no row attends to another request's keys. Measured on this CPU
(Qwen3-small shapes): 48 decode rows of ~300 tokens 6x faster than gather-then-attend, and a
1024-token prefill of four prompts 12x faster than one dense masked attention over all of them.
The loop (trip count traced, so no recompile per length) also beat the same ops unrolled: XLA's
CPU backend fuses a gather into the following dot far less well outside a loop body. Chunks of
128 keys: 512 made the 48-request throughput run 1.5x slower (more padding gathered per row).

A query sees the keys at positions <= its own; a padding query has position -1 and sees none.
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a query that sees no key gets zeros, not NaN
CHUNK_TOKENS = 128  # keys per iteration (measured on CPU: 64 ~ 128 < 512)


def chunk_blocks(block_size: int) -> int:
    """Blocks per iteration; block tables are padded to a multiple of it."""
    return max(1, CHUNK_TOKENS // block_size)


def paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: jax.Array,
    block_tables: jax.Array,  # [rows, blocks]: a multiple of chunk_blocks(block_size)
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    num_chunks: jax.Array,  # []: iterations covering the furthest query (traced: no recompile)
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    rows, q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    chunk = chunk_blocks(block_size)
    q = q.reshape(rows, q_len, num_kv_heads, groups, head_dim).astype(jnp.float32)
    q = q * head_dim**-0.5

    def attend_chunk(index, carry):
        running_max, denominator, numerator = carry
        block_ids = jax.lax.dynamic_slice_in_dim(block_tables, index * chunk, chunk, axis=1)
        k = jnp.take(k_cache, block_ids, axis=0, mode="clip")  # [rows, chunk, kv, block, dim]
        v = jnp.take(v_cache, block_ids, axis=0, mode="clip")
        scores = jnp.einsum("rqkgd,rckbd->rkgqcb", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(rows, num_kv_heads, groups, q_len, chunk * block_size)
        key_positions = index * chunk * block_size + jnp.arange(chunk * block_size)
        visible = key_positions[None, None, :] <= query_positions[:, :, None]
        scores = jnp.where(visible[:, None, None], scores, _MASKED)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        denominator = denominator * rescale + probs.sum(axis=-1)
        probs = probs.reshape(rows, num_kv_heads, groups, q_len, chunk, block_size)
        numerator = numerator * rescale[..., None] + jnp.einsum(
            "rkgqcb,rckbd->rkgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_max, denominator, numerator

    shape = (rows, num_kv_heads, groups, q_len)
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, denominator, numerator = jax.lax.fori_loop(0, num_chunks, attend_chunk, init)
    out = numerator / jnp.maximum(denominator, 1e-30)[..., None]
    out = out.transpose(0, 3, 1, 2, 4).reshape(rows, q_len, num_heads, head_dim)
    return out.astype(v_cache.dtype)
