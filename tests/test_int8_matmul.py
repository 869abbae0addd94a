"""The int8 matmul over int8 activations (folojax/ops/csrc/int8_matmul.cc,
folojax/ops/int8_matmul.py) against numpy: the activations quantized as documented, the integer
sums exact, the scales applied; its layout, XLA's path, the embedding lookup, and the kernel's
other instruction paths (AVX2, AVX-512 without VNNI, portable C++) built for this CPU."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from folojax.model.layers import embedding_rows, linear
from folojax.ops import cpu_kernels, int8_matmul
from folojax.weights.params import int8_linear
from folojax.weights.quantized import quantize_int8_per_channel

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ kernels here")

# rows: none, 1-3 (one tile), 4 and 5 (a tile and a remainder), prefill-sized; outputs inside a
# panel, a partial last panel, many panels; inputs fewer than a quad, not whole quads, not whole
# blocks of 32, whole blocks.
SHAPES = [(0, 64, 32), (1, 5, 3), (2, 64, 32), (3, 70, 50), (4, 130, 96), (5, 200, 577),
          (37, 129, 64)]


def reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """x [m, in] @ (codes * scales).T with x quantized per block of 32 as the module says,
    in exact integers and float64."""
    rows, inner = x.shape
    out = np.zeros((rows, codes.shape[0]))
    for start in range(0, inner, 32):
        block = x[:, start:start + 32].astype(np.float32)
        largest = np.abs(block).max(axis=1, keepdims=True, initial=0)
        inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), 0)
        values = np.clip(np.rint(block * inverse.astype(np.float32)), -127, 127)
        sums = values.astype(np.int64) @ codes[:, start:start + 32].T.astype(np.int64)
        out += sums * (largest.astype(np.float32) / np.float32(127)).astype(np.float64)
    return out * np.asarray(scales, np.float64).reshape(1, -1)


def example(rows: int, out: int, inner: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out, inner), dtype=np.float32)
    quantized = quantize_int8_per_channel(weight)
    x = rng.standard_normal((rows, inner), dtype=np.float32) * 3
    if rows:
        x[0, :32] = 0  # a block of zeros: scale 0
        x[-1, -1] = 40.0  # an outlier: its block's other inputs lose precision, not others
    scales = quantized.scales[:, 0].astype(np.float32)
    return x, quantized.codes, scales


def assert_close(ours, expected):
    ours = np.asarray(ours)
    assert ours.shape == expected.shape
    # float32 sums of exact integer products: only the order of the block sums differs
    np.testing.assert_allclose(ours, expected, rtol=0,
                               atol=1e-5 * max(1.0, np.abs(expected).max(initial=0)))


def test_packing_keeps_every_code_and_the_embedding_rows_dequantize_them():
    x, codes, scales = example(1, 70, 50)
    packed_codes, packed_scales = int8_matmul.pack_int8(codes, scales)
    assert packed_codes.shape == (2, 13, 256) and packed_codes.dtype == np.uint8
    assert packed_scales.shape == (2, 64) and not packed_scales[1, 6:].any()
    # output 65, input 49 sits in panel 1, quad 12, byte 4 * 1 + 1, plus 128
    assert packed_codes[1, 12, 5] == int(codes[65, 49]) + 128
    assert (packed_codes[1, 12, 4 * 6:] == 128).all()  # outputs past 70 are zeros
    np.testing.assert_array_equal(
        np.asarray(int8_matmul.unpack_codes(jnp.asarray(packed_codes), 50))[:70], codes)
    weight = int8_linear(codes.astype(np.float32) * scales[:, None])
    assert (weight.out_features, weight.in_features) == (70, 50)
    dequantized = codes * scales[:, None]
    np.testing.assert_array_equal(np.asarray(weight.dense_weight()), dequantized)
    ids = jnp.asarray([[0, 69], [64, 3]])
    np.testing.assert_array_equal(np.asarray(embedding_rows(weight, ids, jnp.float32)),
                                  dequantized[np.asarray(ids)])


def test_codes_that_are_not_int8_are_refused():
    with pytest.raises(ValueError, match=r"codes must be int8 \[out, in\], got int16"):
        int8_matmul.pack_int8(np.zeros((2, 4), np.int16), np.ones(2))


def test_activations_are_quantized_per_row_and_block_of_32():
    x = np.zeros((2, 70), np.float32)
    x[0, :32] = np.linspace(-2, 1, 32)
    x[1, 64:] = [0.5, -0.25, 0, 0, 0, 1]  # a partial last block
    values, block_scales = map(np.asarray, int8_matmul.quantize_activations(jnp.asarray(x)))
    assert values.shape == (2, 3, 32) and values.dtype == np.int8
    np.testing.assert_array_equal(block_scales,
                                  np.float32([[2, 0, 0], [0, 0, 1]]) / np.float32(127))
    assert values[0, 0, 0] == -127 and values[0, 0, -1] == 64  # 1 * 127 / 2 = 63.5, to even
    np.testing.assert_array_equal(values[1, 2, :6], [64, -32, 0, 0, 0, 127])  # 63.5 -> 64
    assert not values[1, 2, 6:].any() and not values[0, 1:].any()


@needs_kernels
@pytest.mark.parametrize("rows, out, inner", SHAPES)
def test_kernel_equals_the_exact_integer_reference(rows, out, inner):
    x, codes, scales = example(rows, out, inner)
    packed = tuple(map(jnp.asarray, int8_matmul.pack_int8(codes, scales)))
    ours = jax.jit(int8_matmul.kernel_int8_matmul, static_argnums=3)(jnp.asarray(x), *packed,
                                                                      out)
    assert_close(ours, reference(x, codes, scales))


@pytest.mark.parametrize("rows, out, inner", SHAPES[1:])
def test_xla_path_equals_the_exact_integer_reference(rows, out, inner):
    x, codes, scales = example(rows, out, inner)
    packed = tuple(map(jnp.asarray, int8_matmul.pack_int8(codes, scales)))
    ours = int8_matmul.xla_int8_matmul(jnp.asarray(x), *packed, out)
    assert_close(ours, reference(x, codes, scales))


def test_linear_adds_the_bias_and_keeps_leading_dimensions():
    x, codes, scales = example(6, 70, 64)
    weight = int8_linear(codes.astype(np.float32) * scales[:, None], jnp.arange(70.0))
    ours = linear(jnp.asarray(x.reshape(2, 3, 64)), weight)
    assert ours.shape == (2, 3, 70)
    assert_close(np.asarray(ours).reshape(6, 70), reference(x, codes, scales) + np.arange(70))


def test_a_row_does_not_depend_on_its_batch():
    x, codes, scales = example(40, 130, 96)
    weight = int8_linear(codes.astype(np.float32) * scales[:, None])
    alone = np.asarray(linear(jnp.asarray(x[7:8]), weight))
    np.testing.assert_array_equal(np.asarray(linear(jnp.asarray(x), weight))[7:8], alone)


# The kernel's instruction paths besides the one -march=native picks here: each needs its
# instruction set on this CPU (x86-64-v4: AVX-512 without VNNI; v3: AVX2 with maddubs; x86-64:
# the portable loops).
_ARCHES = {"x86-64-v4": ("avx512bw", "avx512vl"), "x86-64-v3": ("avx2", "fma"), "x86-64": ()}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 paths")
@pytest.mark.parametrize("arch", sorted(_ARCHES))
def test_every_instruction_path_equals_the_reference(arch):
    if not all(flag in cpu_kernels.cpu_flags().split() for flag in _ARCHES[arch]):
        pytest.skip(f"this CPU cannot run {arch}")
    try:
        cpu_kernels.compiler()
    except cpu_kernels.KernelBuildError as error:
        pytest.skip(str(error))
    flags = tuple(f"-march={arch}" if flag.startswith("-march") else flag
                  for flag in cpu_kernels.FLAGS)
    library = cpu_kernels.build((cpu_kernels.SOURCE_DIR / "int8_matmul.cc",), flags)
    import ctypes

    target = f"folojax_int8_matmul_{arch.replace('-', '_')}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(
        ctypes.cdll.LoadLibrary(str(library)).FolojaxInt8Matmul), platform="cpu")
    for rows, out, inner in SHAPES[1:]:
        x, codes, scales = example(rows, out, inner, seed=rows)
        packed = tuple(map(jnp.asarray, int8_matmul.pack_int8(codes, scales)))
        ours = int8_matmul.kernel_int8_matmul(jnp.asarray(x), *packed, out, target=target)
        assert_close(ours, reference(x, codes, scales))
