"""The Qwen3 / Qwen2 / Llama decoder as pure functions of (params, config, token ids[, cache]).

params is a pytree of arrays in Hugging Face's [out, in] layout:
  {"embed": [vocab, hidden], "final_norm": [hidden], "lm_head": [vocab, hidden] (absent if tied),
   "layers": [{"input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_norm",
               "gate_proj", "up_proj", "down_proj", + "q_norm", "k_norm" (Qwen3),
               + "q_bias", "k_bias", "v_bias" (Qwen2)}, ...]}
The layers are a Python list walked by a Python loop: each layer's weights stay separate arrays in
their checkpoint layout, which XLA reads faster on CPU than stacked weights under `lax.scan`.
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp

from folojax.config import ModelConfig
from folojax.model.layers import apply_rope, linear, rms_norm, rope_cos_sin, swiglu_mlp
from folojax.ops.attention import causal_attention
from folojax.ops.kv_cache import KVCache, read_layer, write_layer

# How many times each jitted function has been traced (= compiled), by name. Bucketing keeps these
# small; tests and `folojax bench` read them through num_compiles().
_COMPILE_COUNTS: collections.Counter = collections.Counter()


def count_compile(name: str) -> None:
    """Called from inside a jitted function's body, which runs only when it is traced."""
    _COMPILE_COUNTS[name] += 1


def num_compiles(name: str | None = None) -> int:
    """Traces so far of one jitted function, or of all of them."""
    return _COMPILE_COUNTS[name] if name else sum(_COMPILE_COUNTS.values())


def project_qkv(x, layer, config: ModelConfig, cos, sin):
    """Queries [batch, seq, heads, head_dim] and keys, values [batch, seq, kv_heads, head_dim],
    with q/k RMSNorm (Qwen3) and RoPE applied."""
    batch, seq, _ = x.shape
    q = linear(x, layer["q_proj"], layer.get("q_bias"))
    k = linear(x, layer["k_proj"], layer.get("k_bias"))
    v = linear(x, layer["v_proj"], layer.get("v_bias"))
    q = q.reshape(batch, seq, config.num_heads, config.head_dim)
    k = k.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    v = v.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    if config.use_qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def decoder_layers(params, config: ModelConfig, token_ids, positions, attend, cache, keep=None):
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
    """
    x = params["embed"][token_ids]
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    last = len(params["layers"]) - 1
    for layer_index, layer in enumerate(params["layers"]):
        h = rms_norm(x, layer["input_norm"], config.rms_norm_eps)
        q, k, v = project_qkv(h, layer, config, cos, sin)
        out, cache = attend(layer_index, q, k, v, cache)
        out = out.reshape(*out.shape[:2], out.shape[2] * out.shape[3])  # [batch, seq, heads*dim]
        if keep is not None and layer_index == last:
            x, out = (jnp.take_along_axis(a, keep[..., None], axis=1) for a in (x, out))
        x = x + linear(out, layer["o_proj"])
        x = x + swiglu_mlp(rms_norm(x, layer["post_attention_norm"], config.rms_norm_eps), layer)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), cache


def decoder_hidden(params, config: ModelConfig, token_ids, positions, valid, kv_lengths,
                   cache: KVCache | None = None, kv_len: int = 0, keep=None):
    """The decoder over a contiguous cache (or none): [batch, seq] in, hidden states out (of
    the `keep` tokens alone, if given: see decoder_layers).

    Without a cache the queries attend to this call's own keys; with one, the new keys are
    written at `positions` and the queries attend to the cache's first `kv_len` positions.
    """

    def attend(layer_index, q, k, v, cache):
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, dim]
        if cache is None:
            keys, values = k, v
        else:
            cache = write_layer(cache, layer_index, k, v, positions, valid)
            keys, values = read_layer(cache, layer_index, kv_len)
        return causal_attention(q, keys, values, positions, kv_lengths), cache

    return decoder_layers(params, config, token_ids, positions, attend, cache, keep)


def lm_head(params, hidden: jax.Array) -> jax.Array:
    """Logits in float32; a tied head reads the embedding [vocab, hidden] without copying it."""
    weight = params.get("lm_head", params["embed"])
    return jnp.einsum("...h,vh->...v", hidden, weight, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, config: ModelConfig, token_ids):
    count_compile("forward")
    batch, seq = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    valid = jnp.ones((batch, seq), bool)
    hidden, _ = decoder_hidden(params, config, token_ids, positions, valid,
                               jnp.full((batch,), seq))
    return lm_head(params, hidden)


def forward(params, config: ModelConfig, token_ids) -> jax.Array:
    """Logits [batch, seq, vocab] (float32) for token ids [batch, seq]; needs no cache."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim == 1:
        token_ids = token_ids[None]
    return _forward(params, config, token_ids)


def cached_step(params, cache: KVCache, token_ids, num_tokens, config: ModelConfig, kv_len: int):
    """Appends up to seq new tokens per row to the cache; returns each row's last-token logits.

    token_ids [batch, seq]: row b's first num_tokens[b] entries are real, the rest padding
    (num_tokens[b] = 0 leaves row b untouched). Covers prefill (seq > 1) and decode (seq = 1).
    Returns logits [batch, vocab] float32 and the cache with lengths advanced.
    """
    seq = token_ids.shape[1]
    offsets = jnp.arange(seq)[None, :]
    positions = cache.lengths[:, None] + offsets
    valid = offsets < num_tokens[:, None]
    kv_lengths = cache.lengths + num_tokens
    last = jnp.maximum(num_tokens - 1, 0)
    hidden, cache = decoder_hidden(params, config, token_ids, positions, valid, kv_lengths,
                                   cache, kv_len, keep=last[:, None])
    cache = dataclasses.replace(cache, lengths=kv_lengths)
    return lm_head(params, hidden[:, 0]), cache


@functools.partial(jax.jit, static_argnames=("config", "kv_len"), donate_argnames=("cache",))
def _jitted_step(params, cache, token_ids, num_tokens, config, kv_len):
    count_compile("step")
    return cached_step(params, cache, token_ids, num_tokens, config, kv_len)


def prefill(params, cache: KVCache, token_ids, num_tokens, config: ModelConfig,
            kv_len: int | None = None):
    """Writes prompts [batch, seq] (row b: num_tokens[b] real tokens) after each row's cached
    tokens; returns (last-token logits [batch, vocab], new cache). Donates `cache`.

    kv_len (static) bounds the keys attended to; it must cover every row's new length. Default:
    the whole cache.
    """
    kv_len = cache.max_seq_len if kv_len is None else kv_len
    return _jitted_step(params, cache, jnp.asarray(token_ids, jnp.int32),
                        jnp.asarray(num_tokens, jnp.int32), config, kv_len)


def decode_step(params, cache: KVCache, token_ids, config: ModelConfig, active=None,
                kv_len: int | None = None):
    """Appends one token per row (rows where `active` is False are left as they are); returns
    (logits [batch, vocab], new cache). Donates `cache`."""
    token_ids = jnp.asarray(token_ids, jnp.int32).reshape(-1, 1)
    num_tokens = (jnp.ones(token_ids.shape[0], jnp.int32) if active is None
                  else jnp.asarray(active, jnp.int32))
    kv_len = cache.max_seq_len if kv_len is None else kv_len
    return _jitted_step(params, cache, token_ids, num_tokens, config, kv_len)
