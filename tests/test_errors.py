"""Bad input gets a specific exception that names the problem, and the engine keeps working."""

import json
import os
import shutil

import jax
import pytest

import folojax
from folojax.errors import CheckpointError, UnsupportedModelError


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return folojax.LLM(model=tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                       max_model_len=64)


GREEDY = folojax.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def assert_still_works(llm):
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("prompt, error, message", [
    ({"prompt_token_ids": []}, ValueError, "empty"),
    ({"prompt_token_ids": list(range(3, 67))}, ValueError, "64 tokens but max_model_len"),
    ({"prompt_token_ids": [5, 320]}, ValueError, r"invalid token ids .* \[0, 320\)\): \[320\]"),
    ({"prompt_token_ids": [5, "6"]}, ValueError, r"invalid token ids .*: \['6'\]"),
    ("text without a tokenizer", ValueError, "skip_tokenizer_init"),
    (42, TypeError, "a prompt is a string"),
])
def test_bad_prompts_raise_and_llm_still_works(llm, prompt, error, message):
    with pytest.raises(error, match=message):
        llm.generate([{"prompt_token_ids": [1, 2]}, prompt], GREEDY, use_tqdm=False)
    assert_still_works(llm)


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([{"prompt_token_ids": [3]}], [GREEDY, GREEDY], use_tqdm=False)
    assert_still_works(llm)


def test_functional_generate_rejects_more_prompts_than_cache_rows(tiny_qwen3):
    model = tiny_qwen3.model
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=32)
    with pytest.raises(ValueError, match="2 prompts but the cache has batch_size=1"):
        folojax.generate(model.params, cache, jax.random.key(0), [[3, 4], [5]],
                         config=model.config)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        folojax.generate(model.params, cache, jax.random.key(0), [3, 4], config=model.config,
                         sampling=folojax.SamplingParams(stop=["x"]))


def test_model_directory_without_a_tokenizer(tiny_qwen3):
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*skip_tokenizer_init=True"):
        folojax.LLM(model=tiny_qwen3.path)


def test_bad_cache_shape(tiny_qwen3):
    config = tiny_qwen3.model.config
    with pytest.raises(ValueError, match="cache batch_size must be a positive int, got 0"):
        folojax.init_cache(config, batch_size=0, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds the model's max_position"):
        folojax.init_cache(config, batch_size=1, max_seq_len=4096)


def test_missing_checkpoint_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folojax.load_model("./no/such/model/dir")


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pass a local path"):
        folojax.load_model("Qwen/Qwen3-0.6B")


def copy_checkpoint(tiny, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny.path, target)
    return target


def test_truncated_weights_name_the_file(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    weights = path / "model.safetensors"
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: tensor"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_corrupt_header(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        folojax.load_model(str(path), load_tokenizer=False)


def edit_config(path, **changes):
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def test_unknown_architecture(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    edit_config(path, architectures=["MambaForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="'MambaForCausalLM' .* not supported"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_misshaped_tensor_is_named(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    edit_config(path, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                              r"\(128, 64\), expected \(96, 64\)"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_missing_tensor_is_named(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    edit_config(path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="missing .* model.layers.2"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_unexpected_tensor_is_named(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    edit_config(path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.1"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_heads_not_divisible_by_kv_heads(tiny_qwen3, tmp_path):
    path = copy_checkpoint(tiny_qwen3, tmp_path)
    edit_config(path, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads"):
        folojax.load_model(str(path), load_tokenizer=False)


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        folojax.load_model(None, dtype="int8")


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": "abc"}, "LLM seed must be an int"), ({"seed": -1}, "LLM seed must be an int"),
    ({"max_model_len": 0}, "max_model_len must be a positive int or None, got 0"),
    ({"max_logprobs": -1}, "max_logprobs must be an int >= 0"),
    ({"padded_steps_before_compile": 0}, "padded_steps_before_compile must be a positive int"),
])
def test_bad_engine_arguments_fail_before_the_model_loads(kwargs, message):
    # The path does not exist: the argument is rejected before anything tries to load it.
    with pytest.raises(ValueError, match=message):
        folojax.LLM("/no/such/model", **kwargs)


def test_bools_are_not_token_ids(llm):
    with pytest.raises(ValueError, match=r"invalid token ids .*: \[True\]"):
        llm.generate([{"prompt_token_ids": [5, True]}], GREEDY, use_tqdm=False)
    assert_still_works(llm)


def test_forward_names_out_of_range_and_non_integer_ids(tiny_qwen3):
    model = tiny_qwen3.model
    with pytest.raises(ValueError, match=r"outside \[0, 320\): \[320, -1\]"):
        folojax.forward(model.params, model.config, [[3, 320, -1]])
    with pytest.raises(TypeError, match="token_ids must be integers, got dtype bool"):
        folojax.forward(model.params, model.config, [[True, False]])


def test_functional_generate_needs_a_cache_with_rows(tiny_qwen3):
    from folojax.ops.paged_kv_cache import init_paged_cache

    model = tiny_qwen3.model
    pool = init_paged_cache(model.config, num_blocks=4, block_size=16)
    with pytest.raises(TypeError, match="cache must come from folojax.init_cache"):
        folojax.generate(model.params, pool, jax.random.key(0), [3, 4], config=model.config)


def test_prefill_and_decode_step_name_bad_ids_and_a_full_row(tiny_qwen3):
    model = tiny_qwen3.model
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match=r"row 0 has token ids outside \[0, 320\): \[999\]"):
        folojax.prefill(model.params, cache, [[3, 999]], [2], model.config)
    logits, cache = folojax.prefill(model.params, cache, [3] * 16, [16], model.config)
    with pytest.raises(ValueError, match="row 0 holds 16 tokens: 1 more exceed the cache's "
                                         "max_seq_len=16"):
        folojax.decode_step(model.params, cache, [4], model.config)
