"""Loads llama.cpp GGUF files: config from the metadata; weights kept quantized (Q4_0, Q4_1 and
Q8_0 blocks, folojax/weights/quantized.py) or dequantized by the `gguf` package.

Tensors come back under their Hugging Face names so that params.build_params checks them like a
safetensors checkpoint. llama.cpp's converter permutes the rows of the llama q and k projections
for its interleaved RoPE; we undo that here, as transformers' own GGUF loader does.
"""

import os

import numpy as np

from folojax.config import ModelConfig
from folojax.errors import CheckpointError, UnsupportedModelError
from folojax.weights.quantized import GGUF_KEPT_TYPES, QuantizedTensor, from_gguf_blocks

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return gguf_name  # reported as unexpected by build_params


def open_gguf(path: str):
    import gguf  # optional at import time: the GPU machine has no gguf package

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # the reader raises assorted errors on truncated or corrupt files
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, path: str) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(_ARCHITECTURES)}"
        )
    if field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"{path}: RoPE scaling is not supported")
    hidden = field(reader, f"{arch}.embedding_length")
    num_heads = field(reader, f"{arch}.attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=field(reader, f"{arch}.feed_forward_length"),
        num_layers=field(reader, f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=field(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=field(reader, f"{arch}.attention.key_length", hidden // num_heads),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        use_qk_norm=arch == "qwen3",
        attention_bias=arch == "qwen2",
        max_position_embeddings=field(reader, f"{arch}.context_length", 4096),
        eos_token_ids=() if eos is None else (int(eos),),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
    )


def _undo_llama_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores each head's rows as interleaved (even, odd) pairs; HF keeps two halves."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | os.PathLike, reader=None, keep_quantized: bool = False
              ) -> tuple[ModelConfig, list[str], callable]:
    """Returns (config, HF tensor names, load(name)) for a GGUF file (`reader`: the file already
    opened by open_gguf, which parses all its metadata: open it once). load returns float32
    numpy, or with keep_quantized a QuantizedTensor for the Q4_0, Q4_1 and Q8_0 tensors."""
    import gguf

    path = os.fspath(path)
    reader = reader if reader is not None else open_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = {_hf_name(t.name): t for t in reader.tensors}
    permute_heads = {"self_attn.q_proj.weight": config.num_heads,
                     "self_attn.k_proj.weight": config.num_kv_heads}

    def load(name: str) -> np.ndarray | QuantizedTensor:
        tensor = tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        suffix = name.split(".", 3)[-1]
        permute = config.architecture == "LlamaForCausalLM" and suffix in permute_heads
        if keep_quantized and tensor.tensor_type.name in GGUF_KEPT_TYPES and len(shape) == 2:
            weight = from_gguf_blocks(tensor.data, tensor.tensor_type.name, shape,
                                      f"{path}: tensor {tensor.name!r}")
            if permute:
                weight = weight.map_rows(
                    lambda rows: _undo_llama_rope_permutation(rows, permute_heads[suffix]))
            return weight
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{path}: cannot dequantize tensor {tensor.name!r} of type "
                f"{tensor.tensor_type.name}: {e}"
            ) from None
        array = np.asarray(array, np.float32).reshape(shape)
        if permute:
            array = _undo_llama_rope_permutation(array, permute_heads[suffix])
        return array

    return config, list(tensors), load
