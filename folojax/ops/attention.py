"""Dense causal grouped-query attention over a contiguous run of keys: the reference `forward`'s
(folojax/model/decoder.py). Every step with a cache attends through ops/paged_attention.py.

Every query at absolute position p sees the keys at positions <= p that are among its row's first
`kv_lengths[row]` keys.
"""

import jax
import jax.numpy as jnp

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
