"""Writes a random-weight Hugging Face checkpoint of a given shape (benchmarks; no hub here)."""

import json
import os

import ml_dtypes
import numpy as np
import safetensors.numpy

from folojax.config import ModelConfig
from folojax.weights.params import expected_shapes

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def write_random_checkpoint(config_path: str, out_dir: str, seed: int = 0,
                            dtype: str = "bfloat16") -> str:
    """config.json copied from `config_path`, model.safetensors with N(0, 0.02) matrices and unit
    norms. Returns out_dir."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use {', '.join(_DTYPES)}")
    with open(config_path) as f:
        hf_config = json.load(f)
    config = ModelConfig.from_hf_config(hf_config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            array = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            array = np.zeros(shape, np.float32)
        else:
            array = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        tensors[name] = array.astype(_DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, "model.safetensors"),
                                metadata={"format": "pt"})
    return out_dir
