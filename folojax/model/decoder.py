"""The Qwen3 / Qwen2 / Llama decoder as pure functions of (params, config, token ids[, cache]).

params is a ModelWeights pytree (folojax/model/weights.py). The layers are a Python list walked
by a Python loop: each layer's weights stay separate arrays, which XLA reads faster on CPU than
stacked weights under `lax.scan`.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import ModelConfig
from folojax.model.layers import (
    apply_rope,
    embedding_rows,
    linear,
    rms_norm,
    rope_cos_sin,
    swiglu_mlp,
)
from folojax.model.rope import rope_inv_freq
from folojax.model.weights import AttentionWeights, Linear
from folojax.ops.attention import causal_attention

# How many times each jitted function has been traced (= compiled), by name. Bucketing keeps these
# small; tests and `folojax bench` read them through num_compiles().
_COMPILE_COUNTS: collections.Counter = collections.Counter()


def count_compile(name: str) -> None:
    """Called from inside a jitted function's body, which runs only when it is traced."""
    _COMPILE_COUNTS[name] += 1


def num_compiles(name: str | None = None) -> int:
    """Traces so far of one jitted function, or of all of them."""
    return _COMPILE_COUNTS[name] if name else sum(_COMPILE_COUNTS.values())


def project_qkv(x, attention: AttentionWeights, config: ModelConfig, cos, sin):
    """Queries [batch, seq, heads, head_dim] and keys, values [batch, seq, kv_heads, head_dim],
    with q/k RMSNorm (Qwen3) and RoPE applied."""
    batch, seq, _ = x.shape
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    q, k, v = jnp.split(linear(x, attention.qkv), [q_size, q_size + kv_size], axis=-1)
    q = q.reshape(batch, seq, config.num_heads, config.head_dim)
    k = k.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    v = v.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    if config.use_qk_norm:
        q = rms_norm(q, attention.q_norm, config.rms_norm_eps)
        k = rms_norm(k, attention.k_norm, config.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def decoder_layers(params, config: ModelConfig, token_ids, positions, attend, cache, keep=None,
                   rope_length: int | None = None):
    """Runs every layer over token_ids [batch, seq] at `positions` [batch, seq]; returns the
    final-normed hidden states [batch, seq, hidden] and the cache.

    `attend(layer_index, q, k, v, cache) -> (out [batch, seq, heads, head_dim], cache)` stores
    the new keys and values wherever its cache keeps them and attends: the one place the
    contiguous and the paged caches differ.

    keep [batch, n] (optional): the only tokens (indices along seq) whose hidden states are
    wanted, e.g. those that get logits; then [batch, n, hidden] is returned, and the last layer
    runs its output projection and MLP for those tokens alone (every token's keys and values
    are still written). A prefill chunk samples from one token at most, so the rest of the
    chunk skips the last layer's output projection and MLP.

    rope_length: the sequence length RoPE's frequencies are for (folojax/model/rope.py);
    default max_position_embeddings.
    """
    x = embedding_rows(params.embed, token_ids, params.final_norm.dtype)  # the model's dtype
    cos, sin = rope_cos_sin(positions, *rope_inv_freq(
        config, rope_length or config.max_position_embeddings))
    last = len(params.layers) - 1
    for layer_index, layer in enumerate(params.layers):
        x, cache = decoder_layer(layer, layer_index, config, x, cos, sin, attend, cache,
                                 keep if layer_index == last else None)
    return rms_norm(x, params.final_norm, config.rms_norm_eps), cache


def decoder_layer(layer, layer_index: int, config: ModelConfig, x, cos, sin, attend, cache,
                  keep=None):
    """One layer over hidden states x [batch, seq, hidden] (see decoder_layers); keep [batch, n]
    (optional): the only tokens whose outputs are wanted."""
    h = rms_norm(x, layer.input_norm, config.rms_norm_eps)
    q, k, v = project_qkv(h, layer.attention, config, cos, sin)
    out, cache = attend(layer_index, q, k, v, cache)
    out = out.reshape(*out.shape[:2], out.shape[2] * out.shape[3])  # [batch, seq, heads*dim]
    if keep is not None:
        x, out = (jnp.take_along_axis(a, keep[..., None], axis=1) for a in (x, out))
    x = x + linear(out, layer.attention.o)
    x = x + swiglu_mlp(rms_norm(x, layer.post_attention_norm, config.rms_norm_eps), layer.mlp)
    return x, cache


def dense_attend(positions, lengths):
    """An `attend` for decoder_layers with no cache: each row of the batch attends causally to
    its own keys (positions [batch, seq], lengths [batch])."""
    def attend(layer_index, q, k, v, cache):
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, dim]
        return causal_attention(q, k, v, positions, lengths), cache
    return attend


def lm_head(params, hidden: jax.Array) -> jax.Array:
    """Logits in float32; a tied head reads the embedding [vocab, hidden] without copying it."""
    head = params.head
    if isinstance(head, Linear):  # logits in float32 whatever the weights' dtype
        return jnp.einsum("...h,vh->...v", hidden, head.weight,
                          preferred_element_type=jnp.float32)
    return linear(hidden, head).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, config: ModelConfig, token_ids):
    count_compile("forward")
    batch, seq = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    attend = dense_attend(positions, jnp.full((batch,), seq))
    hidden, _ = decoder_layers(params, config, token_ids, positions, attend, None,
                               rope_length=seq)
    return lm_head(params, hidden)


def forward(params, config: ModelConfig, token_ids) -> jax.Array:
    """Logits [batch, seq, vocab] (float32) for token ids [batch, seq]: the dense reference,
    with no cache."""
    ids = np.asarray(token_ids)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        raise ValueError(f"token_ids has ids outside [0, {config.vocab_size}): "
                         f"{bad[:5].tolist()}")
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim == 1:
        ids = ids[None]
    return _forward(params, config, ids)
