"""`x @ w.T` with int8 weights and int8 activations (W8A8): load-time int8 (`quantization=
"int8"`). The C++ kernel runs it on CPU (folojax/ops/csrc/int8_matmul.cc); elsewhere XLA runs
the same math over dequantized values.

The weight w [out, in] is codes * scale, with codes in -127..127 and one scale per output.
It is packed in panels of 64 outputs, 4 consecutive inputs (a quad) per output together, as
integer dot-product instructions (AVX-512 VNNI's vpdpbusd) read them:

    codes   [P, ceil(in / 4), 256] uint8: panel p, quad q, byte 4c + i = code of output 64p + c
            at input 4q + i, plus 128 (0 past the last output or input: 128)
    scales  [P, 64] float32

Activations are quantized on the fly, per row and block of 32 inputs: s = max |x| / 127 and
x_q = round(x * (127 / max |x|)), so each block's sum of code * x_q is an exact integer, and
out = scale * sum over blocks of s * (that sum). A row's result is the same whatever else is in
the batch. quantize_activations gives exactly the kernel's x_q and s.
"""

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels
from folojax.ops.cpu_matmul import PANEL

BLOCK = 32  # inputs per activation scale (the kernel's kBlock)
QUAD = 4  # inputs per 32-bit lane of the packed codes


def pack_int8(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes [out, in] int8 (-127..127) and scales [out] -> (codes, scales) packed as above."""
    codes = np.asarray(codes)
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"codes must be int8 [out, in], got {codes.dtype} {list(codes.shape)}")
    out, inner = codes.shape
    num_panels, quads = -(-out // PANEL), -(-inner // QUAD)
    biased = np.full((num_panels * PANEL, quads * QUAD), 128, np.uint8)
    biased[:out, :inner] = (codes.astype(np.int16) + 128).astype(np.uint8)
    # [P, 64, quads, 4] -> [P, quads, 64, 4]
    packed = biased.reshape(num_panels, PANEL, quads, QUAD).transpose(0, 2, 1, 3)
    column_scales = np.zeros(num_panels * PANEL, np.float32)
    column_scales[:out] = np.asarray(scales, np.float32).reshape(out)
    return (np.ascontiguousarray(packed).reshape(num_panels, quads, PANEL * QUAD),
            column_scales.reshape(num_panels, PANEL))


def unpack_codes(codes: jax.Array, inner: int) -> jax.Array:
    """The packed codes -> int8 codes [P * 64, inner] (padding rows included)."""
    num_panels, quads, _ = codes.shape
    signed = (codes.astype(jnp.int16) - 128).astype(jnp.int8)
    per_input = signed.reshape(num_panels, quads, PANEL, QUAD).transpose(0, 2, 1, 3)
    return per_input.reshape(num_panels * PANEL, quads * QUAD)[:, :inner]


def dequantize_int8(codes: jax.Array, scales: jax.Array, out_features: int, inner: int,
                    dtype=jnp.float32) -> jax.Array:
    """The weight [out_features, inner] as floats of `dtype` (computed in float32)."""
    weight = unpack_codes(codes, inner).astype(jnp.float32) * scales.reshape(-1, 1)
    return weight[:out_features].astype(dtype)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [rows, in] -> (x_q [rows, blocks, 32] int8, zero past `in`; s [rows, blocks] float32),
    the kernel's quantization."""
    rows, inner = x.shape
    blocks = -(-inner // BLOCK)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, blocks * BLOCK - inner)))
    padded = padded.reshape(rows, blocks, BLOCK)
    largest = jnp.max(jnp.abs(padded), axis=-1)
    inverse = jnp.where(largest > 0, 127 / jnp.where(largest > 0, largest, 1), 0)
    values = jnp.clip(jnp.rint(padded * inverse[..., None]), -127, 127).astype(jnp.int8)
    return values, largest / 127


def int8_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, out_features: int
                ) -> jax.Array:
    """x [..., in] @ w.T for the w [out_features, in] packed as above: the kernel for float32 x
    on the CPU backend, else XLA's dot over the dequantized weights and activations (the same
    products, summed in another order)."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.float32 and cpu_kernels.available():
        out = kernel_int8_matmul(rows, codes, scales, out_features)
    else:
        out = xla_int8_matmul(rows, codes, scales, out_features)
    return out.reshape(*x.shape[:-1], out_features)


def kernel_int8_matmul(rows: jax.Array, codes: jax.Array, scales: jax.Array, out_features: int,
                       target: str = cpu_kernels.INT8_MATMUL_TARGET) -> jax.Array:
    """rows [m, in] float32 @ w.T by the C++ kernel registered as `target`."""
    result = jax.ShapeDtypeStruct((rows.shape[0], out_features), jnp.float32)
    return jax.ffi.ffi_call(target, result)(rows, codes, scales)


def xla_int8_matmul(rows: jax.Array, codes: jax.Array, scales: jax.Array, out_features: int
                    ) -> jax.Array:
    """rows [m, in] @ w.T by XLA: the activations quantized as the kernel does, then a dot of
    the dequantized values in rows' dtype."""
    inner = rows.shape[-1]
    values, block_scales = quantize_activations(rows)
    activations = (values.astype(jnp.float32) * block_scales[..., None]).reshape(
        rows.shape[0], -1)[:, :inner].astype(rows.dtype)
    return activations @ dequantize_int8(codes, scales, out_features, inner, rows.dtype).T


def int8_rows(codes: jax.Array, scales: jax.Array, ids: jax.Array, inner: int, dtype
              ) -> jax.Array:
    """Rows `ids` of the packed w, dequantized to `dtype`: [*ids.shape, inner] (an embedding
    lookup from a tied head in this form)."""
    panel, column = ids // PANEL, ids % PANEL
    quads = codes.shape[1]
    row_codes = codes.reshape(codes.shape[0], quads, PANEL, QUAD)[panel, :, column]
    row_codes = row_codes.reshape(*ids.shape, quads * QUAD)[..., :inner]
    values = (row_codes.astype(jnp.float32) - 128) * scales[panel, column][..., None]
    return values.astype(dtype)
