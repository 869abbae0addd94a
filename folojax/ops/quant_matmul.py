"""`x @ w.T` over weights kept quantized: the C++ kernel on CPU
(folojax/ops/csrc/quant_matmul.cc), XLA's dequantize-then-dot elsewhere.

A quantized weight w [out, in] is `codes * scale + offset`, with one scale and one offset per
output row and group of `in / G` consecutive inputs (G = 1: per output channel). It is packed
in the float kernel's panels of 64 outputs (folojax/ops/cpu_matmul.py):

    codes    [P, in, 64] int8 for 8 bits, or [P, in, 32] uint8 for 4 bits (codes 0..15:
             byte b at a depth holds output b in its low nibble and output b + 32 in its high)
    scales   [P, G, 64] float16
    offsets  [P, G, 64] float16

P = ceil(out / 64); outputs past `out` have codes, scales and offsets 0. GGUF's blocks map onto
this exactly: Q8_0 is 8 bits with offset 0, Q4_0 is 4 bits with offset -8 * scale, Q4_1 is 4
bits with its own offset (folojax/weights/quantized.py). With `zero_points`, the offsets array
holds zero points z instead and w = (code - z) * scale (GPTQ's form: the offset -z * scale is
formed in float32, so the weights are exact).
"""

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels
from folojax.ops.cpu_matmul import PANEL, pack_panels


def pack_quantized(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [out, in] (int8: -128..127 for 8 bits, 0..15 for 4), scales and offsets [out, G]
    -> (codes, scales, offsets) in the panel layout above."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    code_panels = pack_panels(np.asarray(codes, np.int8))
    if bits == 4:
        low, high = code_panels[..., :PANEL // 2], code_panels[..., PANEL // 2:]
        code_panels = (low.astype(np.uint8) | (high.astype(np.uint8) << 4)).astype(np.uint8)
    return (code_panels, pack_panels(np.asarray(scales, np.float16)),
            pack_panels(np.asarray(offsets, np.float16)))


def unpack_codes(codes: jax.Array) -> jax.Array:
    """Codes in the panel layout -> int8 [P, in, 64], whatever their bits."""
    if codes.dtype == jnp.int8:
        return codes
    return jnp.concatenate([codes & 15, codes >> 4], axis=-1).astype(jnp.int8)


def _offsets(scales, offsets, zero_points: bool):
    """The offsets in float32 (from zero points: -z * scale)."""
    scales, offsets = scales.astype(jnp.float32), offsets.astype(jnp.float32)
    return -offsets * scales if zero_points else offsets


def dequantize_panels(codes: jax.Array, scales: jax.Array, offsets: jax.Array,
                      dtype=jnp.float32, zero_points: bool = False) -> jax.Array:
    """The weights as floats of `dtype`, [P, in, 64] (computed in float32, then cast)."""
    group_size = codes.shape[1] // scales.shape[1]
    offset = jnp.repeat(_offsets(scales, offsets, zero_points), group_size, axis=1)
    scale = jnp.repeat(scales.astype(jnp.float32), group_size, axis=1)
    return (unpack_codes(codes).astype(jnp.float32) * scale + offset).astype(dtype)


def quant_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, offsets: jax.Array,
                 out_features: int, zero_points: bool = False) -> jax.Array:
    """x [..., in] @ w.T for the w [out_features, in] packed as above: the kernel for float32 x
    on the CPU backend, else XLA's dot over the weights dequantized to x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.float32 and cpu_kernels.available():
        result = jax.ShapeDtypeStruct((rows.shape[0], out_features), jnp.float32)
        out = jax.ffi.ffi_call(cpu_kernels.QUANT_MATMUL_TARGET, result)(
            rows, codes, scales, offsets, zero_points=bool(zero_points))
    else:
        weight = dequantize_panels(codes, scales, offsets, x.dtype, zero_points)
        out = jnp.einsum("mk,pkc->mpc", rows, weight).reshape(rows.shape[0], -1)
        out = out[:, :out_features]
    return out.reshape(*x.shape[:-1], out_features)


def quantized_rows(codes: jax.Array, scales: jax.Array, offsets: jax.Array, ids: jax.Array,
                   dtype, zero_points: bool = False) -> jax.Array:
    """Rows `ids` of the packed w, dequantized to `dtype`: [*ids.shape, in] (an embedding lookup
    from a tied head kept quantized)."""
    panel, column = ids // PANEL, ids % PANEL
    if codes.dtype == jnp.int8:
        row_codes = codes[panel, :, column]
    else:
        byte = codes[panel, :, column % (PANEL // 2)]
        row_codes = jnp.where((column >= PANEL // 2)[..., None], byte >> 4, byte & 15)
    group_size = codes.shape[1] // scales.shape[1]
    row_scales = scales[panel, :, column]
    offset = jnp.repeat(_offsets(row_scales, offsets[panel, :, column], zero_points),
                        group_size, axis=-1)
    scale = jnp.repeat(row_scales.astype(jnp.float32), group_size, axis=-1)
    return (row_codes.astype(jnp.float32) * scale + offset).astype(dtype)
