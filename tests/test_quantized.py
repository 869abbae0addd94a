"""Quantized weights on the host (folojax/weights/quantized.py): GGUF blocks read exactly as the
gguf package dequantizes them, per-channel int8, fused projections."""

import dataclasses

import numpy as np
import pytest

from folojax.errors import CheckpointError
from folojax.weights.quantized import (
    QuantizedTensor,
    check_quantization,
    concatenate_rows,
    from_gguf_blocks,
    quantize_int8_per_channel,
)

gguf = pytest.importorskip("gguf")  # a runtime dependency, but absent on the lent GPU machine


@pytest.mark.parametrize("type_name, bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4)])
def test_gguf_blocks_are_read_as_the_gguf_package_dequantizes_them(type_name, bits):
    weight = np.random.default_rng(0).standard_normal((5, 96), dtype=np.float32)
    weight[1, 32:64] = 0  # a block of zeros: scale 0
    kind = gguf.GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(weight, kind)
    ours = from_gguf_blocks(data, type_name, weight.shape, "w")
    assert ours.bits == bits and ours.group_size == 32 and ours.scales.shape == (5, 3)
    assert ours.codes.min() >= (-128 if bits == 8 else 0)
    assert ours.codes.max() < (128 if bits == 8 else 16)
    np.testing.assert_array_equal(ours.dequantize(),
                                  gguf.quants.dequantize(data, kind).reshape(weight.shape))


def test_a_row_length_that_is_not_whole_blocks_names_the_tensor():
    with pytest.raises(CheckpointError, match="tensor 'w'.*40 inputs.*32"):
        from_gguf_blocks(np.zeros((2, 40), np.uint8), "Q8_0", (2, 40), "tensor 'w'")


def test_int8_per_channel_rounds_each_row_to_its_own_scale():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 50), dtype=np.float32) * np.array([[1], [10], [0.01], [0]])
    quantized = quantize_int8_per_channel(weight)
    assert quantized.codes.dtype == np.int8 and quantized.scales.shape == (4, 1)
    assert not quantized.offsets.any() and np.abs(quantized.codes).max() <= 127
    scale = quantized.scales.astype(np.float32)
    # the scale is rounded to float16, so max |w| / scale may pass 127 a little: clipped, still
    # within half a step
    assert (np.abs(quantized.dequantize() - weight) <= scale * 0.5 + 1e-7).all()
    assert not quantized.dequantize()[3].any()  # a row of zeros stays zeros


def test_fused_rows_stay_quantized_when_every_part_is_and_groups_agree():
    four = QuantizedTensor(np.full((2, 64), 15, np.int8), np.ones((2, 2), np.float16),
                           np.zeros((2, 2), np.float16), 4)
    eight = quantize_int8_per_channel(np.ones((3, 64), np.float32) * 2)
    eight_grouped = QuantizedTensor(np.ones((3, 64), np.int8), np.ones((3, 2), np.float16),
                                    np.zeros((3, 2), np.float16), 8)
    fused = concatenate_rows([four, eight_grouped])
    assert isinstance(fused, QuantizedTensor) and fused.bits == 8 and fused.shape == (5, 64)
    np.testing.assert_array_equal(fused.dequantize()[:2], 15)
    reordered = dataclasses.replace(four, input_order=np.arange(64)[::-1].copy())
    assert isinstance(concatenate_rows([reordered, reordered]), QuantizedTensor)
    zero_points = dataclasses.replace(four, zero_points=True)
    # groups differ; a float; the inputs in another order; zero points beside offsets
    for mixed in ([four, eight], [four, np.ones((3, 64), np.float32)], [four, reordered],
                  [four, zero_points]):
        dense = concatenate_rows(mixed)
        assert isinstance(dense, np.ndarray) and dense.shape[1] == 64
        np.testing.assert_array_equal(dense[:2], 15)


def test_an_unknown_quantization_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="'int4'.*auto, none, int8"):
        check_quantization("int4")
