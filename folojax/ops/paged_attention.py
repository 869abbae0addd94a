"""Attention over the paged cache, gathered by slot: decode rows and prefill chunks.

A step's tokens are flat. Decode rows (one new token each) attend over their own keys, gathered
as [rows, keys]. Prefill chunks are few and long, so their queries attend together over the
concatenated keys of all chunks, masked to each chunk's own request and to positions <= the
query's. Neither pads one request's queries to another's length.
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so that padding queries with nothing to attend to yield zeros, not NaN


def masked_attention(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    k: jax.Array,  # [batch, kv_len, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_len, num_kv_heads, head_dim]
    mask: jax.Array,  # [batch, q_len, kv_len] bool: which keys each query sees
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def decode_attention(
    q: jax.Array,  # [rows, num_heads, head_dim]: one query per row
    k_cache: jax.Array,  # [num_slots, num_kv_heads, head_dim]
    v_cache: jax.Array,
    key_slots: jax.Array,  # [rows, kv_len]: slot of each row's key at position 0, 1, ...
    context_lens: jax.Array,  # [rows]: keys each row sees (its new token's position + 1)
) -> jax.Array:  # [rows, num_heads, head_dim]
    mask = jnp.arange(key_slots.shape[1])[None, None, :] < context_lens[:, None, None]
    return masked_attention(q[:, None], k_cache[key_slots], v_cache[key_slots], mask)[:, 0]


def prefill_attention(
    q: jax.Array,  # [tokens, num_heads, head_dim]
    k_cache: jax.Array,  # [num_slots, num_kv_heads, head_dim]
    v_cache: jax.Array,
    query_positions: jax.Array,  # [tokens]
    query_segments: jax.Array,  # [tokens]: which chunk each query belongs to (-1 = padding)
    key_slots: jax.Array,  # [keys]: the chunks' keys, concatenated
    key_positions: jax.Array,  # [keys]
    key_segments: jax.Array,  # [keys] (-2 = padding)
) -> jax.Array:  # [tokens, num_heads, head_dim]
    mask = (query_segments[:, None] == key_segments[None, :]) & (
        key_positions[None, :] <= query_positions[:, None])
    return masked_attention(q[None], k_cache[key_slots][None], v_cache[key_slots][None],
                            mask[None])[0]
