"""GPTQ checkpoints in Hugging Face's format (as AutoGPTQ and GPTQModel write them and
transformers and vLLM read them): each quantized linear's qweight, qzeros, scales and g_idx
become one QuantizedTensor (folojax/weights/quantized.py) under the linear's `.weight` name.

Per linear with `in` inputs, `out` outputs, b bits (32 / b values per int32, low bits first) and
G groups (group_size inputs each; group_size -1: one group):
  qweight [in * b / 32, out] int32: consecutive inputs packed in each int32
  qzeros  [G, out * b / 32] int32: zero points packed along the outputs; checkpoint_format
          "gptq" (v1) stores each zero point minus one, "gptq_v2" as it is
  scales  [G, out] float16
  g_idx   [in] int32: each input's group; act-order (desc_act) puts inputs in groups out of order
w[o, k] = (q[k, o] - z[g_idx[k], o]) * scales[g_idx[k], o]. G = ceil(in / group_size): the last
group may be partial (SmolLM2's 576 inputs in groups of 128). folojax's groups must be equal, so
each group is held as groups of gcd(group_size, in) inputs sharing its scale and zero point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from folojax.errors import CheckpointError, UnsupportedModelError
from folojax.weights.quantized import QuantizedTensor, dense

SUPPORTED_BITS = (4, 8)
SUPPORTED_FORMATS = ("gptq", "gptq_v2")
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group per linear
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1: zero points stored minus one) or "gptq_v2"


def read_gptq_config(directory: str) -> GPTQConfig | None:
    """The checkpoint's GPTQ settings, from config.json's quantization_config or from
    quantize_config.json; None if it has neither."""
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        settings = json.load(f).get("quantization_config")
    source = f"{config_path}: quantization_config"
    extra = os.path.join(directory, "quantize_config.json")
    if settings is None and os.path.isfile(extra):
        with open(extra) as f:
            settings, source = json.load(f), extra
    if settings is None:
        return None
    method = settings.get("quant_method", "gptq")
    if method != "gptq":
        raise UnsupportedModelError(f"{source}: quant_method {method!r} is not supported; "
                                    "supported: gptq")
    bits = settings.get("bits")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(f"{source}: bits={bits!r} is not supported; GPTQ "
                                    f"checkpoints of {' or '.join(map(str, SUPPORTED_BITS))} "
                                    "bits are")
    group_size = settings.get("group_size", -1)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (
            group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{source}: group_size must be -1 or a positive int, got "
                              f"{group_size!r}")
    checkpoint_format = settings.get("checkpoint_format", "gptq")
    if checkpoint_format not in SUPPORTED_FORMATS:
        raise UnsupportedModelError(f"{source}: checkpoint_format {checkpoint_format!r} is not "
                                    f"supported; supported: {', '.join(SUPPORTED_FORMATS)}")
    return GPTQConfig(bits, group_size, bool(settings.get("desc_act", False)),
                      bool(settings.get("sym", True)), checkpoint_format)


def _unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words [R, C] -> their 32 / bits values each (low bits first), consecutive along
    `axis`: [R * 32 / bits, C] (axis 0) or [R, C * 32 / bits] (axis 1)."""
    words = np.asarray(packed).astype(np.uint32)
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    if axis == 0:
        values = words[:, None, :] >> shifts[None, :, None]
    else:
        values = words[:, :, None] >> shifts[None, None, :]
    shape = (-1, words.shape[1]) if axis == 0 else (words.shape[0], -1)
    return (values & ((1 << bits) - 1)).reshape(shape).astype(np.int32)


def gptq_tensor(prefix: str, parts: dict[str, np.ndarray | None], config: GPTQConfig,
                source: str) -> QuantizedTensor:
    """One linear's QuantizedTensor [out, in] from its GPTQ tensors (parts: qweight, qzeros,
    scales, and g_idx or None)."""
    bits, per_word = config.bits, 32 // config.bits

    def fail(part: str, rule: str):
        raise CheckpointError(f"{source}: tensor {prefix}.{part}: {rule}")

    qweight, qzeros, scales, g_idx = (parts[name] for name in _PARTS)
    if qweight.dtype != np.int32 or qweight.ndim != 2:
        fail("qweight", f"expected int32 [in * {bits} / 32, out], got {qweight.dtype} "
                        f"{list(qweight.shape)}")
    inner, out = qweight.shape[0] * per_word, qweight.shape[1]
    group_size = inner if config.group_size == -1 else min(config.group_size, inner)
    num_groups = -(-inner // group_size)
    if scales.shape != (num_groups, out):
        fail("scales", f"expected [{num_groups}, {out}] (groups, outputs), got "
                       f"{list(scales.shape)}")
    if qzeros.dtype != np.int32 or qzeros.shape != (num_groups, out // per_word) or (
            out % per_word):
        fail("qzeros", f"expected int32 [{num_groups}, {out} * {bits} / 32], got "
                       f"{qzeros.dtype} {list(qzeros.shape)}")
    if g_idx is None:
        if config.desc_act:
            fail("g_idx", "missing, and desc_act (act-order) needs each input's group")
        g_idx = np.arange(inner) // group_size
    g_idx = np.asarray(g_idx).astype(np.int64)
    if g_idx.shape != (inner,) or g_idx.min() < 0 or g_idx.max() >= num_groups:
        fail("g_idx", f"expected [{inner}] group ids in [0, {num_groups}), got shape "
                      f"{list(g_idx.shape)}")
    order = np.argsort(g_idx, kind="stable")  # inputs grouped: group g's are order[g*size:...]
    sizes = np.full(num_groups, group_size)
    sizes[-1] = inner - group_size * (num_groups - 1)
    if (np.bincount(g_idx, minlength=num_groups) != sizes).any():
        fail("g_idx", f"every group must hold group_size={group_size} inputs (the last one "
                      "the rest)")
    codes = _unpack(qweight, bits, axis=0)[order].T  # [out, in], columns in `order`
    zeros = _unpack(qzeros, bits, axis=1).T  # [out, G]
    # Equal groups of gcd(group_size, in) inputs, each with its group's scale and zero point.
    held = math.gcd(group_size, inner)
    group_of_held = np.arange(inner // held) * held // group_size
    zeros, scales = zeros[:, group_of_held], np.asarray(scales)[group_of_held]
    if config.checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores z - 1
    if bits == 8:  # codes 0..255 held as int8: shift codes and zero points alike
        codes, zeros = codes - 128, zeros - 128
    in_order = np.array_equal(order, np.arange(inner))
    return QuantizedTensor(codes.astype(np.int8), np.asarray(scales, np.float16).T.copy(),
                           zeros.astype(np.float16), bits, zero_points=True,
                           input_order=None if in_order else order.astype(np.int32))


def gptq_linears(config: GPTQConfig, names: list[str], load, source: str,
                 keep_quantized: bool = True) -> tuple[list[str], callable]:
    """The checkpoint's tensor names and loader with each GPTQ linear's parts replaced by its
    `.weight` (a QuantizedTensor, or with keep_quantized=False its float32 dequantization).
    A linear's all-zero `.bias`, which GPTQ writers add to linears that have none, is dropped."""
    prefixes = sorted(name[:-len(".qweight")] for name in names if name.endswith(".qweight"))
    present = set(names)
    for prefix in prefixes:
        for part in ("qzeros", "scales"):
            if f"{prefix}.{part}" not in present:
                raise CheckpointError(f"{source}: tensor {prefix}.{part} is missing (every "
                                      "GPTQ linear has qweight, qzeros and scales)")
    dropped = {f"{prefix}.{part}" for prefix in prefixes for part in _PARTS}
    dropped |= {f"{p}.bias" for p in prefixes
                if f"{p}.bias" in present and not np.asarray(load(f"{p}.bias")).any()}
    weights = {f"{prefix}.weight": prefix for prefix in prefixes}

    def load_gptq(name: str):
        if name not in weights:
            return load(name)
        prefix = weights[name]
        parts = {part: load(f"{prefix}.{part}") if f"{prefix}.{part}" in present else None
                 for part in _PARTS}
        tensor = gptq_tensor(prefix, parts, config, source)
        return tensor if keep_quantized else dense(tensor)

    return [n for n in names if n not in dropped] + list(weights), load_gptq
