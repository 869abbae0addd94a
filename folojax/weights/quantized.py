"""Quantized weights on the host, in Hugging Face's [out, in] layout, before they are packed for
the device (folojax/ops/quant_matmul.py): GGUF's Q4_0, Q4_1 and Q8_0 blocks read as they are,
GPTQ's (folojax/weights/gptq.py), and per-output-channel int8 made from float weights at load
time."""

import dataclasses

import numpy as np

from folojax.errors import CheckpointError

# The load-time choices for load_model / LLM / the CLI.
QUANTIZATIONS = ("auto", "none", "int8")


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; use "
                         f"{', '.join(QUANTIZATIONS)}")
    return quantization


@dataclasses.dataclass
class QuantizedTensor:
    """w[o, k] = codes[o, k] * scales[o, g] + offsets[o, g], for k in group g = k // (in / G);
    with zero_points, w[o, k] = (codes[o, k] - offsets[o, g]) * scales[o, g]. With input_order,
    column k of the codes is input input_order[k] of the weight."""
    codes: np.ndarray  # [out, in] int8: -128..127 for 8 bits, 0..15 for 4
    scales: np.ndarray  # [out, G] float16
    offsets: np.ndarray  # [out, G] float16: offsets, or zero points
    bits: int
    zero_points: bool = False
    input_order: np.ndarray | None = None  # [in] int32

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 [out, in], inputs in order."""
        scale = np.repeat(self.scales.astype(np.float32), self.group_size, axis=1)
        offset = np.repeat(self.offsets.astype(np.float32), self.group_size, axis=1)
        if self.zero_points:
            offset = -offset * scale
        weight = self.codes.astype(np.float32) * scale + offset
        if self.input_order is None:
            return weight
        return weight[:, np.argsort(self.input_order)]

    def map_rows(self, rows) -> "QuantizedTensor":
        """The same rows transformation (e.g. a permutation) applied to codes, scales, offsets."""
        return dataclasses.replace(self, codes=rows(self.codes), scales=rows(self.scales),
                                   offsets=rows(self.offsets))


def _same_inputs(parts: list[QuantizedTensor]) -> bool:
    """Whether the parts' columns mean the same: groups, offset form and input order agree."""
    first = parts[0]
    return all(p.group_size == first.group_size and p.zero_points == first.zero_points
               and (p.input_order is None) == (first.input_order is None)
               and (p.input_order is None or np.array_equal(p.input_order, first.input_order))
               for p in parts)


def concatenate_rows(parts: list) -> "QuantizedTensor | np.ndarray":
    """Stacks the rows of `parts` (fusing q/k/v or gate/up): quantized if every part is and
    their columns mean the same (4-bit codes join 8-bit ones as they are: the same values fit),
    else float32."""
    quantized = [p for p in parts if isinstance(p, QuantizedTensor)]
    if len(quantized) == len(parts) and _same_inputs(quantized):
        return dataclasses.replace(
            parts[0], bits=max(p.bits for p in parts),
            **{name: np.concatenate([getattr(p, name) for p in parts])
               for name in ("codes", "scales", "offsets")})
    return np.concatenate([dense(p) for p in parts])


def dense(array) -> np.ndarray:
    """A host tensor as floats: dequantized if it is quantized."""
    return array.dequantize() if isinstance(array, QuantizedTensor) else array


def quantize_int8_per_channel(weight: np.ndarray) -> QuantizedTensor:
    """Symmetric int8 with one float16 scale per output row: codes = round(w / scale),
    scale = max |w| / 127 (a row of zeros gets scale 0)."""
    weight = np.asarray(weight, np.float32)
    scale = (np.abs(weight).max(axis=1, keepdims=True) / 127).astype(np.float16)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)
    codes = np.clip(np.rint(weight / safe), -127, 127).astype(np.int8)
    return QuantizedTensor(codes, scale, np.zeros_like(scale), bits=8)


# GGUF block layouts (ggml's): 32 weights per block, a float16 scale d first.
#   Q8_0: d, then 32 int8 codes                         -> w = d * q
#   Q4_0: d, then 16 bytes of nibbles                    -> w = d * (q - 8)
#   Q4_1: d, m, then 16 bytes of nibbles                 -> w = d * q + m
# Byte j of the nibbles holds weight j (low nibble) and weight j + 16 (high nibble).
GGUF_BLOCK = 32
GGUF_KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def from_gguf_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int],
                     what: str) -> QuantizedTensor:
    """A GGUF tensor's raw blocks (uint8 [out, bytes per row]) of type Q8_0, Q4_0 or Q4_1 ->
    QuantizedTensor [out, in] with groups of 32 (the blocks), exactly the file's values. `what`
    names the tensor in errors."""
    out, inner = shape
    if inner % GGUF_BLOCK:
        raise CheckpointError(f"{what}: {inner} inputs is not a multiple of "
                              f"{GGUF_BLOCK}, the {type_name} block size")
    num_blocks = inner // GGUF_BLOCK
    header = 4 if type_name == "Q4_1" else 2
    payload = GGUF_BLOCK if type_name == "Q8_0" else GGUF_BLOCK // 2
    blocks = np.asarray(data, np.uint8).reshape(out, num_blocks, header + payload)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    payload_bytes = blocks[..., header:]
    if type_name == "Q8_0":
        codes = payload_bytes.view(np.int8)
        offsets = np.zeros_like(scales)
        bits = 8
    else:
        codes = np.concatenate([payload_bytes & 15, payload_bytes >> 4], axis=-1).astype(np.int8)
        bits = 4
        if type_name == "Q4_1":
            offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            with np.errstate(over="ignore"):
                offsets = (scales * np.float16(-8)).astype(np.float16)  # exact: a power of two
            if not np.isfinite(offsets).all():
                raise CheckpointError(f"{what}: a Q4_0 scale times -8 overflows float16")
    return QuantizedTensor(codes.reshape(out, inner), scales, offsets, bits)
