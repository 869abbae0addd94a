"""Scaled RoPE (linear, dynamic, yarn, llama3) against transformers+torch, past the original
context length, from both config spellings: transformers 5's `rope_parameters` and the hub's
older `rope_scaling` beside a top-level `rope_theta`."""

import json

import numpy as np
import pytest
import torch
import transformers

import folojax
from folojax.errors import UnsupportedModelError
from tests.reference.test_hf_equivalence import assert_close

MAX_POSITIONS = 128
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}
# dynamic rescales past max_position_embeddings alone: its prompt goes past that.
LENGTHS = {"dynamic": MAX_POSITIONS + 40}


def make_checkpoint(directory, scaling: dict, spelling: str):
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        rope_parameters={**scaling, "rope_theta": 500.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.15)
    model.save_pretrained(directory)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["rope_parameters"]["rope_type"] == scaling["rope_type"]
    if spelling == "rope_scaling":  # the older hub spelling: "type", theta at the top level
        parameters = saved.pop("rope_parameters")
        saved["rope_theta"] = parameters.pop("rope_theta")
        parameters["type"] = parameters.pop("rope_type")
        saved["rope_scaling"] = parameters
        config_path.write_text(json.dumps(saved))
    return model


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_logits_match_torch_past_the_original_context(tmp_path, name, spelling):
    torch_model = make_checkpoint(tmp_path, SCALINGS[name], spelling)
    model = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False)
    assert model.config.rope_scaling.rope_type == SCALINGS[name]["rope_type"]
    length = LENGTHS.get(name, 100)
    ids = np.random.default_rng(1).integers(3, 320, (1, length)).tolist()
    with torch.no_grad():
        reference = torch_model(torch.tensor(ids)).logits.numpy()
    assert_close(folojax.forward(model.params, model.config, ids), reference)
    if length <= MAX_POSITIONS:  # the paged step, through the cache, within its limits
        cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=MAX_POSITIONS)
        logits, cache = folojax.prefill(model.params, cache, ids, [length], model.config)
        assert_close(logits, reference[:, -1])


def test_a_scaled_rope_does_change_the_logits(tmp_path):
    torch_model = make_checkpoint(tmp_path, SCALINGS["yarn"], "rope_parameters")
    model = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False)
    unscaled = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False)
    config = unscaled.config.__class__(**{**unscaled.config.__dict__, "rope_scaling": None})
    ids = np.random.default_rng(1).integers(3, 320, (1, 100)).tolist()
    ours, plain = (np.asarray(folojax.forward(model.params, c, ids))
                   for c in (model.config, config))
    assert np.abs(ours - plain).max() > 1e-2
    del torch_model


def test_unknown_rope_type_is_rejected(tmp_path):
    make_checkpoint(tmp_path, SCALINGS["linear"], "rope_parameters")
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    saved["rope_parameters"]["rope_type"] = "longrope"
    config_path.write_text(json.dumps(saved))
    with pytest.raises(UnsupportedModelError, match="type 'longrope' is not supported"):
        folojax.load_model(str(tmp_path), load_tokenizer=False)
