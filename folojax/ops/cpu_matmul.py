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


def serves(x: jax.Array, weight: jax.Array) -> bool:
    """Whether the kernel computes x [..., in] @ weight [out, in].T (decided at trace time)."""
    rows = math.prod(x.shape[:-1])
    return (0 < rows <= MAX_ROWS and x.dtype == jnp.float32 and weight.dtype == jnp.float32
            and weight.ndim == 2 and cpu_kernels.available())


def small_matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., in] @ weight [out, in].T, in float32."""
    rows = x.reshape(-1, x.shape[-1])
    call = jax.ffi.ffi_call(cpu_kernels.SMALL_MATMUL_TARGET,
                            jax.ShapeDtypeStruct((rows.shape[0], weight.shape[0]), jnp.float32))
    return call(rows, weight).reshape(*x.shape[:-1], weight.shape[0])
