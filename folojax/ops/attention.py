"""Dense attention, the oracles: causal grouped-query attention over a contiguous run of keys
(the reference `forward`'s, folojax/model/decoder.py), and the `reference` attention backend's
dense scores over the paged cache's blocks gathered per work item (every step with a cache
attends through a backend: folojax/ops/attention_backends.py).

Every query at absolute position p sees the keys at positions <= p that are among its row's first
`kv_lengths[row]` keys (causal_attention), or among its row's work items (dense_paged_attention).
"""

import jax
import jax.numpy as jnp

from folojax.ops.paged_attention import WorkItems

# Added to masked scores; finite so that a row with nothing to attend to yields zeros, not NaN.
_MASKED = -1e30


def causal_attention(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    k: jax.Array,  # [batch, num_kv_heads, kv_len, head_dim] (the cache's layout)
    v: jax.Array,  # [batch, num_kv_heads, kv_len, head_dim]
    q_positions: jax.Array,  # [batch, q_len] absolute positions of the queries
    kv_lengths: jax.Array,  # [batch] number of valid keys per row
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    # [batch, kv_heads, groups * q_len, head_dim]: batch dims lead, as XLA's batched matmul wants.
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, num_kv_heads, groups, q_len, kv_len)
    scores = scores * (head_dim**-0.5)
    key_positions = jnp.arange(kv_len)
    mask = (key_positions[None, None, :] <= q_positions[:, :, None]) & (
        key_positions[None, None, :] < kv_lengths[:, None, None]
    )  # [batch, q_len, kv_len]
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = probs.reshape(batch, num_kv_heads, groups * q_len, kv_len)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    out = out.reshape(batch, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)


def dense_paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: jax.Array,
    items: WorkItems,
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    items_per_iteration: int = 0,
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    """Every query against every key of every work item, in one dense softmax: a key counts for
    a query when its item belongs to the query's row and its position is <= the query's (padding
    items start past every position). No loop, no online softmax, no merge of partials: the
    oracle the other backends are tested against, with memory [rows, heads, q_len, all keys]."""
    del items_per_iteration  # one dense pass
    rows, q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    num_items, blocks_per_item = items.blocks.shape
    item_keys = blocks_per_item * block_size

    def gathered(cache):  # [kv_heads, items * item_keys, head_dim]
        blocks = jnp.take(cache, items.blocks.reshape(-1), axis=0, mode="clip")
        return blocks.transpose(1, 0, 2, 3).reshape(num_kv_heads, num_items * item_keys,
                                                    head_dim).astype(jnp.float32)

    key_positions = (items.starts[:, None] + jnp.arange(item_keys)).reshape(-1)
    key_rows = jnp.repeat(items.rows, item_keys)
    q = q.reshape(rows, q_len, num_kv_heads, groups, head_dim).astype(jnp.float32)
    scores = jnp.einsum("rqhgd,hsd->rhgqs", q, gathered(k_cache),
                        precision=jax.lax.Precision.HIGHEST) * head_dim**-0.5
    visible = ((key_rows[None, None, :] == jnp.arange(rows)[:, None, None])
               & (key_positions[None, None, :] <= query_positions[:, :, None]))
    visible = visible[:, None, None]  # [rows, 1, 1, q_len, keys]
    scores = jnp.where(visible, scores, _MASKED)
    probs = jnp.where(visible, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
    probs = probs / jnp.maximum(probs.sum(axis=-1, keepdims=True), 1e-30)  # nothing seen: 0
    out = jnp.einsum("rhgqs,hsd->rqhgd", probs, gathered(v_cache),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(rows, q_len, num_heads, head_dim).astype(v_cache.dtype)
