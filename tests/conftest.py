"""Shared fixtures: tiny random-weight Hugging Face checkpoints (made here, with their torch twin)
and the embedded SmolLM2 model."""

import dataclasses
import os

import pytest
import torch
import transformers

import folojax

torch.set_num_threads(os.cpu_count() or 1)


@dataclasses.dataclass
class TinyCheckpoint:
    path: str
    torch_model: torch.nn.Module
    model: folojax.Model


# name -> (transformers config class, kwargs). Each covers a different attention layout; none
# uses the default rope_theta, so a config reader that misses it fails the equivalence tests.
TINY_CONFIGS = {
    "qwen3_gqa_tied": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
        rope_theta=1_000_000.0)),
    "qwen3_mha_untied": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
        rope_theta=500.0)),
    "llama_mqa": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_theta=100.0)),
    "qwen2_bias": (transformers.Qwen2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=300.0)),
}


def make_tiny_checkpoint(name: str, directory: str, seed: int = 0) -> TinyCheckpoint:
    config_class, kwargs = TINY_CONFIGS[name]
    config = config_class(vocab_size=320, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, max_position_embeddings=1024, eos_token_id=2,
                          bos_token_id=1, **kwargs)
    torch.manual_seed(seed)
    torch_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger-than-default weights make the logits far from uniform
        for parameter in torch_model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.15)
    torch_model.save_pretrained(directory)
    model = folojax.load_model(directory, dtype="float32", load_tokenizer=False)
    return TinyCheckpoint(directory, torch_model, model)


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny(request, tmp_path_factory) -> TinyCheckpoint:
    return make_tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> TinyCheckpoint:
    return make_tiny_checkpoint("qwen3_gqa_tied", str(tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="session")
def smollm2() -> folojax.LLM:
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session."""
    return folojax.LLM(max_model_len=2048)
