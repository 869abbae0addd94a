"""Two ways to quantize one linear weight [out, in] to integer codes on GPTQ's grid: round-to-
nearest (rtn_quantize) and GPTQ (gptq_quantize, Frantar et al. 2022), which rounds one input
column at a time and spreads each column's rounding error over the columns not yet rounded,
weighted by the inverse Hessian of the layer's reconstruction error ||W X - Q X||^2 over
calibration inputs X. Both return GPTQ's orientation: codes [in, out], zero points and scales
[groups, out], and each input's group.

The grid, per output and group of inputs: asymmetric: scale = (max - min) / maxq over the
group's range widened to hold 0, zero = round(-min / scale); symmetric: the range is +-max |w|,
zero = (maxq + 1) / 2. Scales are float16, as checkpoints store them, and every rounding uses
the stored value. GPTQ v1 checkpoints store each zero point minus one and so cannot hold 0: an
asymmetric group with no negative weight gets zero 1 and scale = max / (maxq - 1) instead,
which still covers its range.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# GPTQ's defaults: columns are rounded in blocks of 128 (the lazy batch update), and the
# Hessian is dampened by 1% of its mean diagonal.
BLOCK_SIZE = 128
DAMPENING = 0.01


@dataclasses.dataclass
class QuantizedWeight:
    """One linear quantized, in GPTQ's orientation (unpacked)."""
    codes: np.ndarray  # [in, out] int, 0..maxq
    zeros: np.ndarray  # [groups, out] int, 1..maxq
    scales: np.ndarray  # [groups, out] float16
    group_index: np.ndarray  # [in] int32: each input's group (GPTQ's g_idx)

    def dequantize(self) -> np.ndarray:
        """The weight [out, in] the codes stand for, in float32."""
        zeros, scales = self.zeros[self.group_index], self.scales[self.group_index]
        return ((self.codes - zeros) * scales.astype(np.float32)).T.astype(np.float32)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Outputs start..stop (e.g. q_proj of a fused q/k/v)."""
        return QuantizedWeight(self.codes[:, start:stop], self.zeros[:, start:stop],
                               self.scales[:, start:stop], self.group_index)


def quantization_grid(weight: jax.Array, bits: int, sym: bool, search: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """GPTQ's grid for weight [out, n] (one group): (scale [out] float16, zero [out] int32).

    search: each output's range is shrunk by the factor, of 1, 0.99, ... 0.2, whose grid
    rounds its weights with the least sum |error|^2.4 (GPTQ's optional grid search: clipping a
    few outliers buys a finer step for the rest)."""
    weight = jnp.asarray(weight, jnp.float32)
    low = jnp.minimum(weight.min(axis=1), 0)
    high = jnp.maximum(weight.max(axis=1), 0)
    if sym:  # +-max |w| (GPTQ keeps 0 as the bottom of a group with no negative weight, which
        # then loses its upper half to clipping)
        high = jnp.maximum(-low, high)
        low = -high
    if not search:
        return _grid_for_range(low, high, bits, sym)

    def error(factor):
        scale, zero = _grid_for_range(low * factor, high * factor, bits, sym)
        return jnp.sum(jnp.abs(round_to_grid(weight, scale, zero, bits)[1] - weight) ** 2.4,
                       axis=1)

    factors = 1 - jnp.arange(_SEARCH_STEPS) / 100
    best = factors[jnp.argmin(jax.lax.map(error, factors), axis=0)]  # [out]
    return _grid_for_range(low * best, high * best, bits, sym)


_SEARCH_STEPS = 81  # shrink factors 1, 0.99, ... 0.2


def _grid_for_range(low, high, bits: int, sym: bool):
    maxq = 2 ** bits - 1
    empty = (low == 0) & (high == 0)
    low, high = jnp.where(empty, -1, low), jnp.where(empty, 1, high)
    scale = ((high - low) / maxq).astype(jnp.float16)
    scale = jnp.where(scale == 0, jnp.float16(2 ** -24), scale)  # underflow
    if sym:
        return scale, jnp.full(low.shape, (maxq + 1) // 2, jnp.int32)
    zero = jnp.clip(jnp.rint(-low / scale.astype(jnp.float32)), 0, maxq).astype(jnp.int32)
    no_negatives = zero == 0  # v1 cannot store a zero point of 0 (see the top)
    shifted = jnp.maximum(high / (maxq - 1), 2 ** -24).astype(jnp.float16)
    return jnp.where(no_negatives, shifted, scale), jnp.where(no_negatives, 1, zero)


def round_to_grid(weight: jax.Array, scale: jax.Array, zero: jax.Array, bits: int
                  ) -> tuple[jax.Array, jax.Array]:
    """weight [out, ...] rounded on the grid (scale, zero [out]) -> (codes int32, the values
    they stand for, float32)."""
    shape = (-1,) + (1,) * (weight.ndim - 1)
    step, zero = scale.astype(jnp.float32).reshape(shape), zero.reshape(shape)
    codes = jnp.clip(jnp.rint(weight / step) + zero, 0, 2 ** bits - 1).astype(jnp.int32)
    return codes, (codes - zero) * step


def rtn_quantize(weight: np.ndarray, bits: int, group_size: int, sym: bool,
                 search: bool = False) -> QuantizedWeight:
    """Round-to-nearest of weight [out, in] by groups of `group_size` consecutive inputs (-1: one
    group; the last group may be partial); search: see quantization_grid."""
    inner = weight.shape[1]
    group_size = inner if group_size == -1 else group_size
    codes, zeros, scales = [], [], []
    for start in range(0, inner, group_size):
        block_codes, scale, zero = _rtn_group(
            jnp.asarray(weight[:, start:start + group_size], jnp.float32), bits, sym, search)
        codes.append(block_codes)
        zeros.append(zero)
        scales.append(scale)
    return QuantizedWeight(np.asarray(jnp.concatenate(codes, axis=1)).T,
                           np.asarray(jnp.stack(zeros)), np.asarray(jnp.stack(scales)),
                           (np.arange(inner) // group_size).astype(np.int32))


@functools.partial(jax.jit, static_argnames=("bits", "sym", "search"))
def _rtn_group(block, bits: int, sym: bool, search: bool):
    scale, zero = quantization_grid(block, bits, sym, search)
    return round_to_grid(block, scale, zero, bits)[0], scale, zero


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                  sym: bool, act_order: bool = False, search: bool = False,
                  dampening: float = DAMPENING) -> QuantizedWeight:
    """GPTQ of weight [out, in] against hessian [in, in] (2 X X^T over the calibration inputs,
    summed or averaged: only its shape matters).

    An input no calibration token used (a zero diagonal) is dead: its weights are set to 0, and
    its Hessian diagonal to 1. act_order rounds inputs in order of decreasing Hessian diagonal;
    groups are then formed in that order, and group_index says which group each input is in.
    Groups start at a column's turn and take their grid from the weights as updated so far;
    search: see quantization_grid.
    """
    inner = weight.shape[1]
    group_size = inner if group_size == -1 or group_size >= inner else group_size
    codes, zeros, scales, order = _gptq(jnp.asarray(weight, jnp.float32),
                                        jnp.asarray(hessian, jnp.float32), bits, group_size,
                                        sym, act_order, search, dampening)
    order = np.asarray(order)
    inverse = np.argsort(order)
    num_groups = -(-inner // group_size)
    return QuantizedWeight(np.asarray(codes)[:, :inner][:, inverse].T,
                           np.asarray(zeros)[:num_groups], np.asarray(scales)[:num_groups],
                           (np.arange(inner) // group_size)[inverse].astype(np.int32))


def layer_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """The reconstruction error tr((W - Q) H (W - Q)^T): ||W X - Q X||^2 when H = X X^T."""
    delta = np.asarray(weight, np.float64) - np.asarray(quantized, np.float64)
    return float(np.einsum("oi,ij,oj->", delta, np.asarray(hessian, np.float64), delta))


@functools.partial(jax.jit,
                   static_argnames=("bits", "group_size", "sym", "act_order", "search"))
def _gptq(weight, hessian, bits: int, group_size: int, sym: bool, act_order: bool,
          search: bool, dampening: float):
    out, inner = weight.shape
    diagonal = jnp.diagonal(hessian)
    dead = diagonal == 0
    hessian = hessian.at[jnp.arange(inner), jnp.arange(inner)].set(jnp.where(dead, 1, diagonal))
    weight = jnp.where(dead[None], 0, weight)
    order = jnp.argsort(-jnp.diagonal(hessian), stable=True) if act_order else jnp.arange(inner)
    weight, hessian = weight[:, order], hessian[order][:, order]
    hessian = hessian + dampening * jnp.mean(jnp.diagonal(hessian)) * jnp.eye(inner)
    # The upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i holds what rounding column i
    # does to the columns after it, relative to U[i, i].
    lower = jnp.linalg.cholesky(hessian)
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(inner))
    upper = jnp.linalg.cholesky(inverse).T
    # Blocks hold whole groups: pad the columns to whole blocks with dead ones (weight 0, no
    # coupling), which round to their zero point exactly.
    block = group_size * max(1, BLOCK_SIZE // group_size) if group_size < inner else inner
    padded = -(-inner // block) * block
    weight = jnp.pad(weight, ((0, 0), (0, padded - inner)))
    upper = jnp.pad(upper, ((0, padded - inner),) * 2).at[
        jnp.arange(inner, padded), jnp.arange(inner, padded)].set(1)
    num_groups = padded // group_size
    whole_grid = quantization_grid(weight, bits, sym, search)  # group_size == inner: one group

    def quantize_block(b, state):
        weight, codes, scales, zeros = state
        start = b * block
        w = jax.lax.dynamic_slice(weight, (0, start), (out, block))
        u = jax.lax.dynamic_slice(upper, (start, start), (block, block))

        def quantize_column(i, state):
            w, errors, codes, scales, zeros, grid = state
            column = start + i
            if group_size < inner:
                grid = jax.lax.cond(column % group_size == 0, lambda: quantization_grid(
                    jax.lax.dynamic_slice(w, (0, i), (out, group_size)), bits, sym, search),
                    lambda: grid)
                group = column // group_size
                scales, zeros = scales.at[group].set(grid[0]), zeros.at[group].set(grid[1])
            code, value = round_to_grid(w[:, i], *grid, bits)
            error = (w[:, i] - value) / u[i, i]
            w = w - error[:, None] * u[i][None]  # u is upper: columns before i are untouched
            return (w, errors.at[:, i].set(error), codes.at[:, column].set(code), scales,
                    zeros, grid)

        errors = jnp.zeros((out, block), jnp.float32)
        _, errors, codes, scales, zeros, _ = jax.lax.fori_loop(
            0, block, quantize_column, (w, errors, codes, scales, zeros, whole_grid))
        # The lazy batch update: the block's errors reach the later columns at once (columns
        # before the block's end are already rounded; U's zeros below the diagonal keep the
        # earlier ones as they are).
        weight = weight - errors @ jax.lax.dynamic_slice(upper, (start, 0), (block, padded))
        return weight, codes, scales, zeros

    codes = jnp.zeros((out, padded), jnp.int32)
    scales = jnp.broadcast_to(whole_grid[0], (num_groups, out))
    zeros = jnp.broadcast_to(whole_grid[1], (num_groups, out))
    _, codes, scales, zeros = jax.lax.fori_loop(0, padded // block, quantize_block,
                                                (weight, codes, scales, zeros))
    return codes, zeros, scales, order
