"""folojax against transformers+torch on the same random-weight checkpoints (fp32)."""

import jax
import numpy as np
import pytest
import torch

import folojax

# Max abs logit difference allowed, relative to the largest torch logit.
RELATIVE_TOLERANCE = 1e-4


def torch_logits(tiny, ids) -> np.ndarray:
    with torch.no_grad():
        return tiny.torch_model(torch.tensor(ids)).logits.numpy()


def assert_close(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.abs(reference).max()
    error = np.abs(ours - reference).max()
    assert error <= RELATIVE_TOLERANCE * scale, f"max |diff| {error} vs logit scale {scale}"


def hf_greedy(tiny, prompt, max_new_tokens):
    with torch.no_grad():
        out = tiny.torch_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_ids(length, seed=0, batch=None, vocab=320):
    shape = (length,) if batch is None else (batch, length)
    return np.random.default_rng(seed).integers(3, vocab, shape).tolist()


def test_forward_logits_match_torch(tiny):
    ids = random_ids(23, batch=2)
    logits = folojax.forward(tiny.model.params, tiny.model.config, ids)
    assert_close(logits, torch_logits(tiny, ids))


def test_prefill_then_decode_matches_forward(tiny):
    ids = random_ids(20, seed=1, batch=2)
    full = np.asarray(folojax.forward(tiny.model.params, tiny.model.config, ids))
    cache = folojax.init_cache(tiny.model.config, batch_size=2, max_seq_len=64)
    prompt = np.asarray(ids)[:, :12]
    logits, cache = folojax.prefill(tiny.model.params, cache, prompt, [12, 12], tiny.model.config)
    assert_close(logits, full[:, 11])
    for t in range(12, 20):
        logits, cache = folojax.decode_step(tiny.model.params, cache, np.asarray(ids)[:, t],
                                            tiny.model.config)
        assert_close(logits, full[:, t])
    assert np.asarray(cache.lengths).tolist() == [20, 20]


def test_greedy_tokens_match_hf_generate(tiny):
    prompt = random_ids(9, seed=2)
    cache = folojax.init_cache(tiny.model.config, batch_size=1, max_seq_len=128)
    result = folojax.generate(tiny.model.params, cache, jax.random.key(0), prompt,
                              config=tiny.model.config,
                              sampling=folojax.SamplingParams(temperature=0, max_tokens=24,
                                                              ignore_eos=True))
    assert result.token_ids[0] == hf_greedy(tiny, prompt, 24)
    assert result.finish_reasons == ["length"]


def test_batch_of_different_lengths_matches_one_at_a_time(tiny_qwen3):
    model = tiny_qwen3.model
    prompts = [random_ids(n, seed=n) for n in (3, 17, 40)]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cache = folojax.init_cache(model.config, batch_size=4, max_seq_len=128)
    batched = folojax.generate(model.params, cache, jax.random.key(0), prompts,
                               config=model.config, sampling=sampling)
    for prompt, tokens in zip(prompts, batched.token_ids, strict=True):
        assert tokens == hf_greedy(tiny_qwen3, prompt, 12)


def test_generate_continues_after_cached_tokens(tiny_qwen3):
    """A second generate on the returned cache continues the conversation, like one long prompt."""
    model = tiny_qwen3.model
    greedy = folojax.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first_prompt, second_prompt = random_ids(10, seed=5), random_ids(7, seed=6)
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=128)
    first = folojax.generate(model.params, cache, jax.random.key(0), first_prompt,
                             config=model.config, sampling=greedy)
    # The cache holds the prompt and every generated token but the last (never fed back).
    history = first_prompt + first.token_ids[0][:-1]
    assert int(first.cache.lengths[0]) == len(history)
    second = folojax.generate(model.params, first.cache, jax.random.key(0),
                              [first.token_ids[0][-1]] + second_prompt, config=model.config,
                              sampling=greedy)
    full_prompt = history + [first.token_ids[0][-1]] + second_prompt
    assert second.token_ids[0] == hf_greedy(tiny_qwen3, full_prompt, 6)


def test_eos_stops_generation(tiny_qwen3):
    model = tiny_qwen3.model
    prompt = random_ids(8, seed=7)
    reference = hf_greedy(tiny_qwen3, prompt, 20)
    eos = reference[4]  # pretend the fifth greedy token is EOS
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=64)
    result = folojax.generate(model.params, cache, jax.random.key(0), prompt, config=model.config,
                              sampling=folojax.SamplingParams(temperature=0, max_tokens=20),
                              eos_token_ids=(eos,))
    assert result.token_ids[0] == reference[:reference.index(eos) + 1]
    assert result.finish_reasons == ["stop"] and result.stop_reasons == [None]


@pytest.mark.parametrize("use_llm_api", [True, False])
def test_llm_with_token_prompts_matches_hf(tiny_qwen3, use_llm_api):
    prompts = [random_ids(n, seed=10 + n) for n in (5, 30)]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    if use_llm_api:
        llm = folojax.LLM(model=tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling,
                               use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outputs]
        assert [o.prompt_token_ids for o in outputs] == prompts
    else:
        cache = folojax.init_cache(tiny_qwen3.model.config, batch_size=2, max_seq_len=64)
        tokens = folojax.generate(tiny_qwen3.model.params, cache, jax.random.key(0), prompts,
                                  config=tiny_qwen3.model.config, sampling=sampling).token_ids
    assert tokens == [hf_greedy(tiny_qwen3, p, 10) for p in prompts]


def test_params_are_typed_with_fused_projections(tiny):
    from folojax.model.weights import Linear, ModelWeights, PanelLinear

    params, config = tiny.model.params, tiny.model.config
    assert isinstance(params, ModelWeights)
    assert isinstance(params.layers[0].attention.qkv, (Linear, PanelLinear))
    state = tiny.torch_model.state_dict()
    qkv = np.asarray(params.layers[1].attention.qkv.dense_weight())
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    for name, rows in (("q", slice(0, q_rows)), ("k", slice(q_rows, q_rows + kv_rows)),
                       ("v", slice(q_rows + kv_rows, None))):
        np.testing.assert_array_equal(
            qkv[rows], state[f"model.layers.1.self_attn.{name}_proj.weight"].numpy())
    gate_up = np.asarray(params.layers[0].mlp.gate_up.dense_weight())
    np.testing.assert_array_equal(gate_up[config.intermediate_size:],
                                  state["model.layers.0.mlp.up_proj.weight"].numpy())
    assert (params.layers[0].attention.qkv.bias is not None) == config.attention_bias
    assert (params.lm_head is None) == config.tie_word_embeddings


def test_decode_step_leaves_inactive_rows_as_they_are(tiny_qwen3):
    model = tiny_qwen3.model
    cache = folojax.init_cache(model.config, batch_size=2, max_seq_len=32)
    _, cache = folojax.prefill(model.params, cache, [[5, 6, 7], [8, 9, 10]], [3, 2], model.config)
    logits, cache = folojax.decode_step(model.params, cache, [11, 12], model.config,
                                        active=[False, True])
    assert np.asarray(cache.lengths).tolist() == [3, 3]
    assert not np.asarray(logits)[0].any() and np.asarray(logits)[1].any()
    logits, cache = folojax.decode_step(model.params, cache, [1, 1], model.config,
                                        active=[False, False])
    assert np.asarray(cache.lengths).tolist() == [3, 3] and not np.asarray(logits).any()
    _, cache = folojax.prefill(model.params, cache, [[0], [0]], [0, 0], model.config)
    # Row 1 holds 8, 9, 12: its logits after 13 match the dense forward's.
    logits, _ = folojax.decode_step(model.params, cache, [0, 13], model.config,
                                    active=[False, True])
    assert_close(logits[1], folojax.forward(model.params, model.config, [[8, 9, 12, 13]])[0, -1])
