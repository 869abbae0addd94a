"""Pure building blocks of the decoder: linear layers, RMSNorm, rotary embeddings, the SwiGLU MLP.

Weights keep Hugging Face's [out, in] layout and are applied as `x @ w.T`: XLA folds the
transpose into the matmul instead of copying the weight.
"""

import functools

import jax
import jax.numpy as jnp

from folojax.model.weights import Linear, MLPWeights
from folojax.ops import cpu_matmul


def linear(x: jax.Array, weight) -> jax.Array:
    """`x @ W.T (+ b)`, by the weight's type (a Linear here; another weight type registers its
    own with `apply_linear.register`)."""
    return apply_linear(weight, x)


@functools.singledispatch
def apply_linear(weight, x: jax.Array) -> jax.Array:
    raise TypeError(f"no linear for weights of type {type(weight).__name__}")


@apply_linear.register
def _(weight: Linear, x: jax.Array) -> jax.Array:
    y = matmul_transposed(x, weight.weight)
    return y if weight.bias is None else y + weight.bias


def matmul_transposed(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., in] @ weight [out, in].T: a few float32 rows on CPU by the C++ kernel
    (folojax/ops/cpu_matmul.py), else XLA's dot."""
    if cpu_matmul.serves(x, weight):
        return cpu_matmul.small_matmul(x, weight)
    return x @ weight.T


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
    angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, seq, heads, head_dim] by the half-split (non-interleaved) convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def swiglu_mlp(x: jax.Array, mlp: MLPWeights) -> jax.Array:
    gate, up = jnp.split(linear(x, mlp.gate_up), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, mlp.down)
