"""`x @ w.T` for a few rows of x by the C++ kernel (folojax/ops/csrc/matmul.cc) on CPU: decode's
matmuls stream the weights at a rate this code controls, whichever CPU runs it, instead of the
rate XLA's codegen happens to reach for that shape (docs/BENCHMARKS.md).

Used for float32 inputs of at most MAX_ROWS rows on the CPU backend where the kernels load
(FOLOJAX_NATIVE_KERNELS=0: never); everything else is XLA's dot.
"""

import math

import jax
import jax.numpy as jnp

from folojax.ops import cpu_kernels

MAX_ROWS = 48  # measured: from 64 rows XLA's matmul does as well or better
DOT_ROWS = 8  # up to here the kernel's dot-product tiles, above them its broadcast tiles


def serves(x: jax.Array, weight: jax.Array) -> bool:
    """Whether the kernel computes x [..., in] @ weight [out, in].T (decided at trace time)."""
    rows = math.prod(x.shape[:-1])
    return (0 < rows <= MAX_ROWS and x.dtype == jnp.float32 and weight.dtype == jnp.float32
            and weight.ndim == 2 and cpu_kernels.available())


def small_matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., in] @ weight [out, in].T, in float32, for at most MAX_ROWS rows of x."""
    rows = x.reshape(-1, x.shape[-1])
    num_rows = rows.shape[0]
    if not 0 < num_rows <= MAX_ROWS:
        raise ValueError(f"small_matmul serves 1 to {MAX_ROWS} rows of x, got {num_rows}")
    result = jax.ShapeDtypeStruct((num_rows, weight.shape[0]), jnp.float32)
    if num_rows <= DOT_ROWS:
        out = jax.ffi.ffi_call(cpu_kernels.SMALL_MATMUL_TARGET, result)(rows, weight)
    else:  # the kernel takes x transposed, its rows padded to a multiple of 16
        transposed = jnp.pad(rows.T, ((0, 0), (0, -num_rows % 16)))
        out = jax.ffi.ffi_call(cpu_kernels.MANY_ROWS_MATMUL_TARGET, result)(transposed, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])
