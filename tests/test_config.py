import json

import numpy as np
import pytest

from folojax.config import ModelConfig, RopeScaling
from folojax.errors import UnsupportedModelError
from folojax.weights.gguf import _undo_llama_rope_permutation

QWEN3_0_6B = "configs/qwen3-0.6b.json"


def test_qwen3_config_from_json_is_hashable_and_complete():
    config = ModelConfig.from_json_file(QWEN3_0_6B)
    assert hash(config) == hash(ModelConfig.from_json_file(QWEN3_0_6B))
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        28, 16, 8, 128)
    assert config.use_qk_norm and config.tie_word_embeddings and not config.attention_bias
    assert config.eos_token_ids == (151645,) and config.num_query_groups == 2


def test_rope_theta_is_read_from_either_config_format():
    """transformers >= 5 writes rope_theta inside rope_parameters; older files at top level."""
    base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    new = ModelConfig.from_hf_config(
        {**base, "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"}})
    old = ModelConfig.from_hf_config({**base, "rope_theta": 12345.0})
    assert new.rope_theta == old.rope_theta == 12345.0


def test_rope_scaling_is_read_and_checked():
    base = json.load(open(QWEN3_0_6B))
    yarn = ModelConfig.from_hf_config({**base, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert yarn.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    assert ModelConfig.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2}}
                                      ).rope_scaling.factor == 2.0
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'su' is not supported"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"type": "su", "factor": 2}})
    with pytest.raises(ValueError, match="needs a 'factor'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"type": "linear"}})


def test_undo_llama_rope_permutation_inverts_llama_cpp_permutation():
    """llama.cpp's converter maps HF rows (two halves per head) to interleaved pairs."""
    num_heads, head_dim, hidden = 3, 8, 5
    hf = np.arange(num_heads * head_dim * hidden, dtype=np.float32).reshape(-1, hidden)
    llama_cpp = (hf.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2)
                 .reshape(hf.shape))
    np.testing.assert_array_equal(_undo_llama_rope_permutation(llama_cpp, num_heads), hf)
