"""The quantized matmul (folojax/ops/csrc/quant_matmul.cc, folojax/ops/quant_matmul.py) against a
plain numpy dequantize-then-matmul, its panel layout, XLA's path, and the embedding lookup from a
quantized head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from folojax.model.layers import embedding_rows, linear
from folojax.model.weights import QuantLinear
from folojax.ops import cpu_kernels, quant_matmul
from folojax.weights.quantized import QuantizedTensor

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ kernels here")


def random_quantized(rng, out: int, inner: int, num_groups: int, bits: int) -> QuantizedTensor:
    low, high = (-128, 128) if bits == 8 else (0, 16)
    codes = rng.integers(low, high, (out, inner)).astype(np.int8)
    scales = (rng.standard_normal((out, num_groups)) * 0.05).astype(np.float16)
    offsets = (rng.standard_normal((out, num_groups)) * 0.05).astype(np.float16)
    return QuantizedTensor(codes, scales, offsets, bits)


def quant_linear(weight: QuantizedTensor, bias=None) -> QuantLinear:
    packed = quant_matmul.pack_quantized(weight.codes, weight.scales, weight.offsets, weight.bits)
    order = None if weight.input_order is None else jnp.asarray(weight.input_order)
    return QuantLinear(*map(jnp.asarray, packed), weight.shape[0],
                       None if bias is None else jnp.asarray(bias), order, weight.zero_points)


def with_zero_points(weight: QuantizedTensor, rng, reorder: bool = False) -> QuantizedTensor:
    """The same codes and scales with integer zero points (GPTQ's form), optionally with the
    inputs out of order."""
    low, high = (-128, 128) if weight.bits == 8 else (0, 17)
    zeros = rng.integers(low, high, weight.scales.shape).astype(np.float16)
    order = rng.permutation(weight.shape[1]).astype(np.int32) if reorder else None
    return QuantizedTensor(weight.codes, weight.scales, zeros, weight.bits, zero_points=True,
                           input_order=order)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out, inner, num_groups", [(1, 32, 1), (63, 64, 2), (65, 96, 3),
                                                    (200, 40, 1)])
def test_packed_codes_give_back_the_dequantized_weight_exactly(bits, out, inner, num_groups):
    weight = random_quantized(np.random.default_rng(out), out, inner, num_groups, bits)
    packed = quant_linear(weight)
    width = 64 if bits == 8 else 32
    assert packed.codes.shape == (-(-out // 64), inner, width) and packed.bits == bits
    assert packed.scales.shape == (-(-out // 64), num_groups, 64)
    np.testing.assert_array_equal(np.asarray(packed.dense_weight()), weight.dequantize())


# Rows: 1-3 (one tile), 4-7 (two tiles, a remainder), 31 (the most before a panel is
# dequantized first), 32 and 33 (dequantized into the float tiles), prefill-sized; outputs
# inside a panel, a partial last panel, many panels; one group, several, groups of 32; and no
# rows at all.
@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, inner, out, num_groups", [
    (1, 576, 960, 18), (2, 64, 7, 1), (3, 96, 130, 3), (4, 1536, 65, 48), (5, 40, 200, 2),
    (7, 577, 64, 1), (31, 64, 129, 2), (32, 96, 70, 3), (33, 64, 4097, 2), (300, 128, 130, 4),
    (0, 32, 70, 1)])
def test_quant_matmul_equals_numpy_dequantize_then_matmul(bits, rows, inner, out, num_groups):
    rng = np.random.default_rng(rows * inner + out + bits)
    weight = random_quantized(rng, out, inner, num_groups, bits)
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    packed = quant_linear(weight)
    ours = np.asarray(jax.jit(quant_matmul.quant_matmul, static_argnums=4)(
        jnp.asarray(x), packed.codes, packed.scales, packed.offsets, out))
    reference = x.astype(np.float64) @ weight.dequantize().T.astype(np.float64)
    # float32 rounding over sums in another order (per group, then scaled); a wrong code, scale,
    # nibble or column is off by O(1) of the largest output.
    assert ours.shape == (rows, out)
    assert np.abs(ours - reference).max(initial=0) <= 2e-5 * np.abs(reference).max(initial=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("kernels", [True, False])
def test_zero_points_and_reordered_inputs_equal_numpy(monkeypatch, bits, rows, kernels):
    if kernels and not cpu_kernels.available():
        pytest.skip("no C++ kernels here")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda backend=None: False)
    rng = np.random.default_rng(rows + bits)
    weight = with_zero_points(random_quantized(rng, 130, 96, 3, bits), rng, reorder=True)
    dense = weight.dequantize()  # inputs in order: the zero points applied, the order undone
    np.testing.assert_array_equal(dense[:, weight.input_order],
                                  (weight.codes - np.repeat(weight.offsets, 32, 1).astype(
                                      np.float32)) * np.repeat(weight.scales, 32, 1))
    packed = quant_linear(weight)
    np.testing.assert_array_equal(np.asarray(packed.dense_weight()), dense)
    x = rng.standard_normal((rows, 96), dtype=np.float32)
    # A fresh function: jit's cache must not hand one path's compiled step to the other.
    ours = np.asarray(jax.jit(lambda x, w: linear(x, w))(jnp.asarray(x), packed))
    reference = x.astype(np.float64) @ dense.T.astype(np.float64)
    assert np.abs(ours - reference).max() <= 2e-5 * np.abs(reference).max()
    table = with_zero_points(random_quantized(rng, 70, 64, 2, bits), rng)
    ids = jnp.asarray([0, 33, 69])
    np.testing.assert_array_equal(
        np.asarray(embedding_rows(quant_linear(table), ids, jnp.float32)),
        table.dequantize()[np.asarray(ids)])


@pytest.mark.parametrize("bits", [4, 8])
def test_without_the_kernels_xla_dequantizes_then_multiplies(monkeypatch, bits):
    monkeypatch.setattr(cpu_kernels, "available", lambda backend=None: False)
    rng = np.random.default_rng(bits)
    weight = random_quantized(rng, 70, 64, 2, bits)
    bias = rng.standard_normal(70, dtype=np.float32)
    x = rng.standard_normal((2, 3, 64), dtype=np.float32)
    ours = np.asarray(linear(jnp.asarray(x), quant_linear(weight, bias)))
    assert ours.shape == (2, 3, 70)
    np.testing.assert_allclose(ours, x @ weight.dequantize().T + bias, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_quant_linear_adds_its_bias_and_keeps_leading_dims():
    rng = np.random.default_rng(5)
    weight = random_quantized(rng, 70, 64, 2, 4)
    bias = rng.standard_normal(70, dtype=np.float32)
    x = rng.standard_normal((2, 5, 64), dtype=np.float32)
    ours = np.asarray(jax.jit(linear)(jnp.asarray(x), quant_linear(weight, bias)))
    np.testing.assert_allclose(ours, x @ weight.dequantize().T + bias, rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_take_xla_and_stay_close():
    rng = np.random.default_rng(6)
    weight = random_quantized(rng, 70, 64, 2, 8)
    x = rng.standard_normal((3, 64), dtype=np.float32)
    ours = linear(jnp.asarray(x, jnp.bfloat16), quant_linear(weight))
    assert ours.dtype == jnp.bfloat16
    reference = x @ weight.dequantize().T
    assert np.abs(np.asarray(ours, np.float32) - reference).max() < 0.02 * np.abs(reference).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_rows_are_dequantized_from_a_quantized_head(bits):
    table = random_quantized(np.random.default_rng(7), 130, 64, 2, bits)
    ids = jnp.asarray([[0, 31, 32], [63, 64, 129]])  # both nibbles, two panels, the last row
    rows = embedding_rows(quant_linear(table), ids, jnp.float32)
    np.testing.assert_array_equal(np.asarray(rows), table.dequantize()[np.asarray(ids)])
