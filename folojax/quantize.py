"""`folojax quantize`: a model's linear weights quantized and written as a standard Hugging Face
GPTQ checkpoint (v1 zero points, the layout folojax/weights/gptq.py reads and vLLM and
transformers recognise): config.json with its `quantization_config`, the tokenizer's files when
the source has a tokenizer, and model.safetensors. The source is a GGUF file or an HF directory,
read as float32; every tensor but the decoder's linear weights is written as float32.

Methods (folojax/quant_methods.py): round-to-nearest (`rtn`) per group, and `gptq`, which
quantizes layer by layer: each layer's linears, in the order q/k/v, o, gate/up, down, are
quantized against the Hessian of their inputs on calibration text (folojax/calibration.py),
taken with the linears before them already quantized, and the next layer's inputs are the
quantized layer's outputs.
"""

from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from folojax.quant_methods import QuantizedWeight, gptq_quantize, rtn_quantize
from folojax.weights.gptq import SUPPORTED_BITS
from folojax.weights.params import LAYER_LINEARS, expected_shapes
from folojax.weights.quantized import dense

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
QUANTIZED_LINEARS = tuple(part for parts in LAYER_LINEARS.values() for part in parts)
# GPTQ's calibration, by default: 128 segments (as the GPTQ paper takes) of 256 tokens.
CALIBRATION_SAMPLES = 128
CALIBRATION_LENGTH = 256
_CALIBRATION_BATCH = 8  # segments per jitted layer pass


def pack_gptq(weight: QuantizedWeight, bits: int) -> dict[str, np.ndarray]:
    """GPTQ v1 tensors: qweight [in * bits / 32, out], qzeros [G, out * bits / 32] (each zero
    point stored minus one), scales [G, out] float16, g_idx [in]."""
    def pack_rows(values: np.ndarray) -> np.ndarray:
        per_word = 32 // bits
        grouped = values.reshape(-1, per_word, values.shape[1]).astype(np.uint32)
        words = np.zeros(grouped[:, 0].shape, np.uint32)
        for j in range(per_word):
            words |= (grouped[:, j] & np.uint32(2 ** bits - 1)) << np.uint32(bits * j)
        return words.view(np.int32)

    return {"qweight": pack_rows(weight.codes), "qzeros": pack_rows((weight.zeros - 1).T).T.copy(),
            "scales": weight.scales.astype(np.float16),
            "g_idx": weight.group_index.astype(np.int32)}


def quantize_checkpoint(model: str | None, out_dir: str, method: str = "rtn", bits: int = 4,
                        group_size: int = 128, sym: bool = True, act_order: bool = False,
                        grid_search: bool = False,
                        calibration_samples: int = CALIBRATION_SAMPLES,
                        calibration_length: int = CALIBRATION_LENGTH,
                        calibration_ids: np.ndarray | None = None,
                        progress: bool = True) -> str:
    """Writes the quantized checkpoint of `model` (a path; None: the embedded SmolLM2) to
    out_dir; returns out_dir. GPTQ calibrates on calibration_ids [samples, length] when given,
    else on calibration_samples segments of calibration_length tokens of the standard
    library's docstrings (folojax/calibration.py), tokenized by the model's tokenizer."""
    from safetensors.numpy import save_file

    from folojax.weights.loader import read_checkpoint, resolve_model_path

    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not supported; use {', '.join(METHODS)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--bits must be {' or '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"--group-size must be -1 or positive, got {group_size}")
    if act_order and method != "gptq":
        raise ValueError("--act-order applies to --method gptq only")
    if calibration_samples <= 0 or calibration_length <= 0:
        raise ValueError("--calibration-samples and --calibration-length must be positive, got "
                         f"{calibration_samples} and {calibration_length}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty: give a new directory")
    source = resolve_model_path(model)
    checkpoint = read_checkpoint(source, keep_quantized=False)
    wanted = expected_shapes(checkpoint.config)  # what the model uses: a tied head copy is dropped
    linears = [name for name in sorted(wanted) if name.endswith(".weight")
               and name.removesuffix(".weight").split(".", 3)[-1] in QUANTIZED_LINEARS]
    for name in linears:
        if any(size % (32 // bits) for size in wanted[name]):
            raise ValueError(f"{source}: {name} is {list(wanted[name])}: GPTQ packs "
                             f"{32 // bits} {bits}-bit values per int32 along both dimensions, "
                             "so both must be multiples of that")
    if method == "gptq":
        if calibration_ids is None:
            calibration_ids = _calibration_ids(checkpoint, calibration_samples,
                                               calibration_length)
        quantized = gptq_linears(checkpoint, calibration_ids, bits, group_size, sym, act_order,
                                 grid_search, progress)
    else:
        quantized = {name.removesuffix(".weight"): rtn_quantize(
            np.asarray(dense(checkpoint.load(name)), np.float32), bits, group_size, sym,
            grid_search)
            for name in tqdm(linears, desc="Quantizing", unit="linear", disable=not progress)}
    tensors = {}
    for name in sorted(wanted):
        prefix = name.removesuffix(".weight")
        if prefix in quantized:
            tensors.update({f"{prefix}.{part}": value
                            for part, value in pack_gptq(quantized[prefix], bits).items()})
        else:
            tensors[name] = np.asarray(dense(checkpoint.load(name)), np.float32)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    hf_config = _hf_config(checkpoint)
    hf_config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
        "sym": sym, "checkpoint_format": "gptq",
        "quantizer": f"folojax {method}{' grid-search' if grid_search else ''}"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _save_tokenizer(checkpoint, out_dir)
    return out_dir


def gptq_linears(checkpoint, calibration_ids: np.ndarray, bits: int, group_size: int, sym: bool,
                 act_order: bool, grid_search: bool = False, progress: bool = True
                 ) -> dict[str, QuantizedWeight]:
    """GPTQ of every decoder linear, layer by layer (see the top) -> {HF name without
    ".weight": its quantization}."""
    from folojax.calibration import LINEAR_GROUPS, layer_linear, layer_pass, with_layer_linear
    from folojax.model.layers import embedding_rows
    from folojax.model.weights import Linear
    from folojax.weights.params import build_params

    config = checkpoint.config
    ids = np.asarray(calibration_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise ValueError(f"calibration_ids must be integer token ids [samples, length], got "
                         f"shape {list(ids.shape)} of {ids.dtype}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"calibration_ids has ids outside [0, {config.vocab_size})")
    params = build_params(config, checkpoint.names, checkpoint.load,
                          lambda array: jnp.asarray(array, jnp.float32), checkpoint.source)
    batches = [jnp.asarray(ids[i:i + _CALIBRATION_BATCH], jnp.int32)
               for i in range(0, len(ids), _CALIBRATION_BATCH)]
    hidden = [embedding_rows(params.embed, batch, jnp.float32) for batch in batches]
    shapes = expected_shapes(config)
    quantized = {}
    layers = tqdm(params.layers, desc=f"GPTQ on {ids.size} tokens", unit="layer",
                  disable=not progress)
    for index, layer in enumerate(layers):
        for group in LINEAR_GROUPS:
            hessian = sum(layer_pass(layer, config, h, group) for h in hidden)
            weight = layer_linear(layer, group)
            result = gptq_quantize(np.asarray(weight.weight), np.asarray(hessian), bits,
                                   group_size, sym, act_order, grid_search)
            layer = with_layer_linear(layer, group, Linear(jnp.asarray(result.dequantize()),
                                                           weight.bias))
            start = 0
            for part in LAYER_LINEARS[group]:  # fused rows split back (GPTQ rounds each row alone)
                name = f"model.layers.{index}.{part}"
                rows = shapes[f"{name}.weight"][0]
                quantized[name] = result.rows(start, start + rows)
                start += rows
        hidden = [layer_pass(layer, config, h, None) for h in hidden]
    return quantized


def _calibration_ids(checkpoint, samples: int, length: int) -> np.ndarray:
    from folojax.calibration import calibration_segments, stdlib_docstrings
    from folojax.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(checkpoint.source, gguf_reader=checkpoint.gguf_reader)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ValueError(f"{checkpoint.source} has no tokenizer ({error}): GPTQ needs one to "
                         "tokenize its calibration text") from error
    token_ids = tokenizer.encode(stdlib_docstrings(), add_special_tokens=False)
    return calibration_segments(token_ids, samples, length)


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
