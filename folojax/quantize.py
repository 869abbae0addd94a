"""`folojax quantize`: a model's linear weights quantized and written as a standard Hugging Face
GPTQ checkpoint (v1 zero points, the layout folojax/weights/gptq.py reads and vLLM and
transformers recognise): config.json with its `quantization_config`, the tokenizer's files when
the source has a tokenizer, and model.safetensors. The source is a GGUF file or an HF directory,
read as float32; every tensor but the decoder's linear weights is written as float32.

Method: round-to-nearest (`rtn`) per group of inputs, with GPTQ's quantization grid: per output
and group, asymmetric: scale = (max - min) / maxq over the group's range widened to hold 0,
zero = round(-min / scale); symmetric: the range is +-max |w|, zero = (maxq + 1) / 2. GPTQ v1
stores each zero point minus one and so cannot hold 0: an asymmetric group with no negative
weight gets zero 1 and scale = max / (maxq - 1) instead, which still covers its range.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from tqdm.auto import tqdm

from folojax.weights.gptq import SUPPORTED_BITS
from folojax.weights.params import expected_shapes
from folojax.weights.quantized import dense

logger = logging.getLogger(__name__)

METHODS = ("rtn",)
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantization_grid(weight: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's grid for weight [out, n] (one group): (scale [out] float16, zero [out] int)."""
    maxq = 2 ** bits - 1
    low = np.minimum(weight.min(axis=1), 0).astype(np.float32)
    high = np.maximum(weight.max(axis=1), 0).astype(np.float32)
    if sym:  # +-max |w| (GPTQ keeps 0 as the bottom of a group with no negative weight, which
        # then loses its upper half to clipping)
        high = np.maximum(np.abs(low), high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = np.where(empty, -1, low), np.where(empty, 1, high)
    scale = ((high - low) / maxq).astype(np.float16)
    safe = np.where(scale == 0, np.float16(2 ** -24), scale).astype(np.float16)  # underflow
    if sym:
        return safe, np.full(weight.shape[0], (maxq + 1) // 2)
    zero = np.clip(np.rint(-low / safe.astype(np.float32)), 0, maxq).astype(np.int64)
    no_negatives = zero == 0  # v1 cannot store a zero point of 0 (see the top)
    shifted = np.maximum(high / (maxq - 1), 2 ** -24).astype(np.float16)
    return np.where(no_negatives, shifted, safe), np.where(no_negatives, 1, zero)


def rtn_quantize(weight: np.ndarray, bits: int, group_size: int, sym: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest of weight [out, in] by groups of inputs (group_size -1: one group) ->
    (codes [in, out], zeros [G, out], scales [G, out] float16), GPTQ's orientation."""
    out, inner = weight.shape
    group_size = inner if group_size == -1 else group_size  # the last group may be partial
    maxq = 2 ** bits - 1
    codes = np.empty((inner, out), np.int64)
    zeros, scales = [], []
    for start in range(0, inner, group_size):
        block = weight[:, start:start + group_size].astype(np.float32)
        scale, zero = quantization_grid(block, bits, sym)
        step = scale.astype(np.float32)[:, None]
        codes[start:start + group_size] = np.clip(
            np.rint(block / step) + zero[:, None], 0, maxq).T
        zeros.append(zero)
        scales.append(scale)
    return codes, np.stack(zeros), np.stack(scales)


def pack_gptq(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int,
              group_size: int) -> dict[str, np.ndarray]:
    """GPTQ v1 tensors: qweight [in * bits / 32, out], qzeros [G, out * bits / 32] (each zero
    point stored minus one), scales [G, out] float16, g_idx [in] (group_size -1: one group)."""
    def pack_rows(values: np.ndarray) -> np.ndarray:
        per_word = 32 // bits
        grouped = values.reshape(-1, per_word, values.shape[1]).astype(np.uint32)
        words = np.zeros(grouped[:, 0].shape, np.uint32)
        for j in range(per_word):
            words |= (grouped[:, j] & np.uint32(2 ** bits - 1)) << np.uint32(bits * j)
        return words.view(np.int32)

    inner = codes.shape[0]
    group_size = inner if group_size == -1 else group_size
    return {"qweight": pack_rows(codes), "qzeros": pack_rows((zeros - 1).T).T.copy(),
            "scales": scales.astype(np.float16),
            "g_idx": (np.arange(inner) // group_size).astype(np.int32)}


def quantize_checkpoint(model: str | None, out_dir: str, method: str = "rtn", bits: int = 4,
                        group_size: int = 128, sym: bool = True, progress: bool = True) -> str:
    """Writes the quantized checkpoint of `model` (a path; None: the embedded SmolLM2) to
    out_dir; returns out_dir."""
    from safetensors.numpy import save_file

    from folojax.weights.loader import read_checkpoint, resolve_model_path

    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not supported; use {', '.join(METHODS)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--bits must be {' or '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"--group-size must be -1 or positive, got {group_size}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty: give a new directory")
    source = resolve_model_path(model)
    checkpoint = read_checkpoint(source, keep_quantized=False)
    config = checkpoint.config
    wanted = expected_shapes(config)  # only what the model uses: a tied lm_head copy is dropped
    tensors = {}
    for name in tqdm(sorted(wanted), desc="Quantizing", unit="tensor", disable=not progress):
        array = np.asarray(dense(checkpoint.load(name)), np.float32)
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.split(".", 3)[-1] in QUANTIZED_LINEARS:
            if array.shape[0] % (32 // bits) or array.shape[1] % (32 // bits):
                raise ValueError(f"{source}: {name} is {list(array.shape)}: GPTQ packs "
                                 f"{32 // bits} {bits}-bit values per int32 along both "
                                 "dimensions, so both must be multiples of that")
            packed = pack_gptq(*rtn_quantize(array, bits, group_size, sym), bits, group_size)
            tensors.update({f"{prefix}.{part}": value for part, value in packed.items()})
        else:
            tensors[name] = array
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    hf_config = _hf_config(checkpoint)
    hf_config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
        "sym": sym, "checkpoint_format": "gptq", "quantizer": f"folojax {method}"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _save_tokenizer(checkpoint, out_dir)
    return out_dir


def _hf_config(checkpoint) -> dict:
    """The source's config.json (an HF directory), or one written from the GGUF's metadata."""
    if checkpoint.gguf_file is None:
        with open(os.path.join(checkpoint.source, "config.json")) as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        return config
    return checkpoint.config.to_hf_config()


def _save_tokenizer(checkpoint, out_dir: str) -> None:
    from folojax.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(checkpoint.source, gguf_reader=checkpoint.gguf_reader)
    except (FileNotFoundError, ValueError, KeyError) as error:
        logger.warning("%s has no tokenizer to copy (%s): the output has none",
                       checkpoint.source, error)
        return
    tokenizer.save_pretrained(out_dir)
