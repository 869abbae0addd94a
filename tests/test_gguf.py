"""GGUF loading: tiny llama GGUF files written here the way llama.cpp's converter writes them."""

import os

import jax
import numpy as np
import pytest
import torch

import folojax
from folojax.errors import CheckpointError
from folojax.model.weights import QuantLinear
from tests.conftest import make_tiny_checkpoint
from tests.reference.test_hf_equivalence import assert_close, torch_logits

gguf = pytest.importorskip("gguf")  # a runtime dependency, but absent on the lent GPU machine

GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows (interleaved RoPE pairs)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1)
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(tiny, path: str, matrix_type: gguf.GGMLQuantizationType) -> dict:
    """Writes the torch model as a llama GGUF; returns {HF name: the weight as stored, restored}."""
    config = tiny.torch_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_eos_token_id(2)
    stored = {}
    for name, tensor in tiny.torch_model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, suffix = name.split(".", 3)[2:]
            gguf_name = f"blk.{layer}.{GGUF_NAMES[suffix]}"
            if suffix == "self_attn.q_proj.weight":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif suffix == "self_attn.k_proj.weight":
                array = llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(array, matrix_type)
            writer.add_tensor(gguf_name, data, raw_dtype=matrix_type)
            stored[name] = gguf.quants.dequantize(data, matrix_type).reshape(array.shape)
        else:
            writer.add_tensor(gguf_name, array)
            stored[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_checkpoint("llama_mqa", str(tmp_path_factory.mktemp("llama")))


def test_f32_gguf_matches_torch(tiny_llama, tmp_path):
    """Name mapping and the undone q/k permutation: logits equal the torch model's."""
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(tiny_llama, path, gguf.GGMLQuantizationType.F32)
    model = folojax.load_model(path, dtype="float32", load_tokenizer=False)
    assert model.config.num_kv_heads == 1 and not model.config.tie_word_embeddings
    ids = np.random.default_rng(0).integers(3, 320, (2, 19)).tolist()
    assert_close(folojax.forward(model.params, model.config, ids), torch_logits(tiny_llama, ids))


KEPT_TYPES = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
              gguf.GGMLQuantizationType.Q4_1]


@pytest.mark.parametrize("quantization", ["auto", "none"])
@pytest.mark.parametrize("matrix_type", [gguf.GGMLQuantizationType.F16, *KEPT_TYPES])
def test_quantized_gguf_weights_are_read_exactly_and_unpermuted(tiny_llama, tmp_path,
                                                                matrix_type, quantization):
    """Kept quantized ("auto") or dequantized ("none"), the weights are the file's values."""
    path = str(tmp_path / f"tiny-{matrix_type.name}.gguf")
    stored = write_llama_gguf(tiny_llama, path, matrix_type)
    model = folojax.load_model(path, dtype="float32", load_tokenizer=False,
                               quantization=quantization)
    kept = quantization == "auto" and matrix_type in KEPT_TYPES
    for linear in (model.params.layers[0].attention.qkv, model.params.lm_head):
        assert isinstance(linear, QuantLinear) == kept
    assert isinstance(model.params.embed, jax.Array)  # untied: the lookup stays float
    num_heads = tiny_llama.torch_model.config.num_attention_heads
    restored_q = stored["model.layers.1.self_attn.q_proj.weight"]
    restored_q = (restored_q.reshape(num_heads, -1, 2, restored_q.shape[1]).swapaxes(1, 2)
                  .reshape(restored_q.shape))  # undo the writer's permutation
    qkv = np.asarray(model.params.layers[1].attention.qkv.dense_weight())
    np.testing.assert_array_equal(qkv[:restored_q.shape[0]], restored_q)
    np.testing.assert_array_equal(np.asarray(model.params.layers[0].mlp.down.dense_weight()),
                                  stored["model.layers.0.mlp.down_proj.weight"])
    original = tiny_llama.torch_model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    quantization_error = np.abs(restored_q - original.numpy()).max()
    assert quantization_error < 0.1 * np.abs(original.numpy()).max()


@pytest.mark.parametrize("matrix_type", KEPT_TYPES)
def test_kept_quantized_logits_equal_the_dequantized_models(tiny_llama, tmp_path, matrix_type):
    """The same weights either way: only the order of float32 sums differs."""
    path = str(tmp_path / f"tiny-{matrix_type.name}.gguf")
    write_llama_gguf(tiny_llama, path, matrix_type)
    kept, dequantized = (folojax.load_model(path, dtype="float32", load_tokenizer=False,
                                            quantization=quantization)
                         for quantization in ("auto", "none"))
    ids = np.random.default_rng(1).integers(3, 320, (2, 19)).tolist()
    ours = np.asarray(folojax.forward(kept.params, kept.config, ids))
    reference = np.asarray(folojax.forward(dequantized.params, dequantized.config, ids))
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()


def test_truncated_gguf_is_a_checkpoint_error(tiny_llama, tmp_path):
    path = str(tmp_path / "truncated.gguf")
    write_llama_gguf(tiny_llama, path, gguf.GGMLQuantizationType.F32)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        folojax.load_model(path, load_tokenizer=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        folojax.load_model(str(path), load_tokenizer=False)


torch.set_num_threads(os.cpu_count() or 1)
