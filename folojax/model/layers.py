"""Pure building blocks of the decoder: linear layers, RMSNorm, rotary embeddings, the SwiGLU MLP.

A Linear keeps Hugging Face's [out, in] layout and is applied as `x @ w.T` by XLA, which folds
the transpose into the matmul instead of copying the weight. On CPU, float32 weights are loaded as
PanelLinear, the C++ matmul kernel's layout (folojax/ops/cpu_matmul.py); quantized weights are a
QuantLinear in the same panels (folojax/ops/quant_matmul.py), or, quantized to int8 at load
time, an Int8Linear (folojax/ops/int8_matmul.py).
"""

import functools

import jax
import jax.numpy as jnp

from folojax.model.weights import Int8Linear, Linear, MLPWeights, PanelLinear, QuantLinear
from folojax.ops import cpu_matmul, int8_matmul, quant_matmul


def linear(x: jax.Array, weight) -> jax.Array:
    """`x @ W.T (+ b)`, by the weight's type (a Linear here; another weight type registers its
    own with `apply_linear.register`)."""
    return apply_linear(weight, x)


@functools.singledispatch
def apply_linear(weight, x: jax.Array) -> jax.Array:
    raise TypeError(f"no linear for weights of type {type(weight).__name__}")


@apply_linear.register
def _(weight: Linear, x: jax.Array) -> jax.Array:
    y = x @ weight.weight.T
    return y if weight.bias is None else y + weight.bias


@apply_linear.register
def _(weight: PanelLinear, x: jax.Array) -> jax.Array:
    y = cpu_matmul.panel_matmul(x, weight.panels, weight.out_features)
    return y if weight.bias is None else y + weight.bias


@apply_linear.register
def _(weight: QuantLinear, x: jax.Array) -> jax.Array:
    if weight.input_order is not None:
        x = jnp.take(x, weight.input_order, axis=-1)
    y = quant_matmul.quant_matmul(x, weight.codes, weight.scales, weight.offsets,
                                  weight.out_features, weight.zero_points)
    return y if weight.bias is None else y + weight.bias


@apply_linear.register
def _(weight: Int8Linear, x: jax.Array) -> jax.Array:
    y = int8_matmul.int8_matmul(x, weight.codes, weight.scales, weight.out_features)
    return y if weight.bias is None else y + weight.bias


def embedding_rows(table, token_ids: jax.Array, dtype) -> jax.Array:
    """The embedding of `token_ids` in `dtype`: rows of a [vocab, hidden] table, or of a tied
    head kept only as panels (a PanelLinear) or quantized (a QuantLinear or an Int8Linear,
    dequantized here)."""
    if isinstance(table, PanelLinear):
        return cpu_matmul.panel_rows(table.panels, token_ids).astype(dtype)
    if isinstance(table, Int8Linear):
        return int8_matmul.int8_rows(table.codes, table.scales, token_ids, table.in_features,
                                     dtype)
    if isinstance(table, QuantLinear):  # a tied head: GGUF's, never reordered
        return quant_matmul.quantized_rows(table.codes, table.scales, table.offsets, token_ids,
                                           dtype, table.zero_points)
    return table[token_ids].astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by `weight` in x's dtype (as Hugging Face does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq, scale: float = 1.0
                 ) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for `positions` [batch, seq] and inverse frequencies [head_dim / 2]
    (folojax/model/rope.py) -> two arrays [batch, seq, head_dim], times `scale`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # [batch, seq, head_dim / 2]: each once
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, seq, heads, head_dim] by the half-split (non-interleaved) convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def swiglu_mlp(x: jax.Array, mlp: MLPWeights) -> jax.Array:
    gate, up = jnp.split(linear(x, mlp.gate_up), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, mlp.down)
