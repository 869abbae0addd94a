"""Request semantics through the one engine core, against torch or an independent reference:
logprobs, penalties over a whole generation, max_tokens=None, bf16 on CPU, aborts that return
every block, and stop strings that span tokens."""

import copy

import jax
import numpy as np
import pytest
import torch

import folojax
from tests.reference.test_hf_equivalence import random_ids
from tests.test_llm_engine import record_dispatches_and_reads

BF16_RELATIVE_TOLERANCE = 3e-2  # max |logit diff| / max |logit|, bf16 weights and activations


def make_llm(tiny, **kwargs) -> folojax.LLM:
    return folojax.LLM(tiny.path, skip_tokenizer_init=True, dtype="float32", **kwargs)


def torch_log_softmax(tiny, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = tiny.torch_model(torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), -1).numpy()


def test_logprobs_and_top_n_equal_torch_log_softmax(tiny_qwen3):
    prompt = random_ids(11, seed=3)
    sampling = folojax.SamplingParams(temperature=0.8, seed=5, max_tokens=8, logprobs=5,
                                      ignore_eos=True)
    [output] = make_llm(tiny_qwen3).generate({"prompt_token_ids": prompt}, sampling,
                                             use_tqdm=False)
    completion = output.outputs[0]
    total = 0.0
    for step, (token, logprobs) in enumerate(zip(completion.token_ids, completion.logprobs,
                                                 strict=True)):
        reference = torch_log_softmax(tiny_qwen3, prompt + completion.token_ids[:step])
        top = np.argsort(-reference)[:5]
        assert set(logprobs) == set(top.tolist()) | {token}
        for token_id, value in logprobs.items():
            assert value == pytest.approx(reference[token_id], abs=1e-4)
        total += reference[token]
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def assert_prompt_logprobs_equal_torch(prompt_logprobs, tiny, prompt: list[int], top_n: int):
    with torch.no_grad():
        logits = tiny.torch_model(torch.tensor([prompt])).logits[0]
    reference = torch.log_softmax(logits.double(), -1).numpy()  # row q scores token q + 1
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for index in range(1, len(prompt)):
        row = reference[index - 1]
        entry = prompt_logprobs[index]
        assert set(entry) == set(np.argsort(-row)[:top_n].tolist()) | {prompt[index]}, index
        for token_id, value in entry.items():
            assert value == pytest.approx(row[token_id], abs=1e-4)


def test_prompt_logprobs_equal_torch_log_softmax_across_chunks_and_cache_hits(tiny_qwen3):
    """A 150-token prompt in chunks of 64; asked again, its blocks are in the prefix cache, yet
    every prompt token is scored again; n=2 scores the prompt once."""
    prompt = random_ids(150, seed=4)
    llm = make_llm(tiny_qwen3, max_num_batched_tokens=64)
    for n in (1, 2):
        sampling = folojax.SamplingParams(max_tokens=2, prompt_logprobs=3, n=n, seed=1)
        [output] = llm.generate({"prompt_token_ids": prompt}, sampling, use_tqdm=False)
        assert len(output.outputs) == n and output.num_cached_tokens == 0
        assert_prompt_logprobs_equal_torch(output.prompt_logprobs, tiny_qwen3, prompt, 3)
    [plain] = llm.generate({"prompt_token_ids": prompt}, folojax.SamplingParams(max_tokens=2),
                           use_tqdm=False)
    assert plain.prompt_logprobs is None and plain.num_cached_tokens == 144  # 9 full blocks


def test_prompt_logprobs_zero_and_the_functional_generate(tiny_qwen3):
    prompt = random_ids(20, seed=6)
    sampling = folojax.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    [output] = make_llm(tiny_qwen3).generate({"prompt_token_ids": prompt}, sampling,
                                             use_tqdm=False)
    assert_prompt_logprobs_equal_torch(output.prompt_logprobs, tiny_qwen3, prompt, 0)
    model = tiny_qwen3.model
    cache = folojax.init_cache(model.config, 2, 64, model.dtype)
    result = folojax.generate(model.params, cache, jax.random.key(0), [prompt, prompt[:5]],
                              config=model.config, sampling=sampling)
    assert result.prompt_logprobs[0] == output.prompt_logprobs
    assert_prompt_logprobs_equal_torch(result.prompt_logprobs[1], tiny_qwen3, prompt[:5], 0)


@pytest.mark.parametrize("value, message", [
    (-1, "SamplingParams.prompt_logprobs must be None or an int >= 0, got -1"),
    (21, "SamplingParams.prompt_logprobs=21 exceeds max_logprobs=20")])
def test_bad_prompt_logprobs_are_rejected_by_name(tiny_qwen3, value, message):
    llm = make_llm(tiny_qwen3)
    with pytest.raises(ValueError, match=message):
        llm.generate({"prompt_token_ids": [1, 2]},
                     folojax.SamplingParams(prompt_logprobs=value), use_tqdm=False)
    assert llm.generate({"prompt_token_ids": [1, 2]}, folojax.SamplingParams(max_tokens=1),
                        use_tqdm=False)[0].outputs[0].token_ids  # still usable


def numpy_penalized_greedy(tiny, prompt, num_tokens, repetition, presence, frequency):
    """vLLM's penalty rules applied by hand to torch's logits, one token at a time."""
    outputs = []
    for _ in range(num_tokens):
        with torch.no_grad():
            logits = tiny.torch_model(torch.tensor([prompt + outputs])).logits[0, -1].numpy()
        logits = logits.astype(np.float64)
        counts = np.bincount(outputs, minlength=logits.shape[0])
        seen = counts > 0
        seen[prompt] = True
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition),
                          logits)
        logits = logits - frequency * counts - presence * (counts > 0)
        outputs.append(int(np.argmax(logits)))
    return outputs


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalties_over_a_whole_generation_equal_a_numpy_reference(tiny_qwen3, async_scheduling):
    prompts = [random_ids(9, seed=4), random_ids(5, seed=6)]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                      repetition_penalty=1.6, presence_penalty=0.7,
                                      frequency_penalty=0.4)
    llm = make_llm(tiny_qwen3, async_scheduling=async_scheduling)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == numpy_penalized_greedy(
            tiny_qwen3, prompt, 16, 1.6, 0.7, 0.4)
    cache = folojax.init_cache(tiny_qwen3.model.config, batch_size=2, max_seq_len=64)
    result = folojax.generate(tiny_qwen3.model.params, cache, jax.random.key(0), prompts,
                              config=tiny_qwen3.model.config, sampling=sampling)
    assert result.token_ids == [o.outputs[0].token_ids for o in outputs]


def test_penalties_force_no_synchronous_step(tiny_qwen3, monkeypatch):
    events = record_dispatches_and_reads(monkeypatch)
    engine = make_llm(tiny_qwen3).llm_engine
    engine.add_request("a", [5, 6, 7], folojax.SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5))
    while engine.has_unfinished_requests():
        engine.step()
    assert events == ["dispatch"] + ["dispatch", "read"] * 5 + ["read"]


def test_max_tokens_none_stops_at_max_model_len(tiny_qwen3):
    sampling = folojax.SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    [output] = make_llm(tiny_qwen3, max_model_len=40).generate({"prompt_token_ids": [5] * 10},
                                                               sampling, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 30
    assert output.outputs[0].finish_reason == "length"
    model = tiny_qwen3.model
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=40)
    result = folojax.generate(model.params, cache, jax.random.key(0), [5] * 10, config=model.config,
                              sampling=sampling)
    assert result.token_ids[0] == output.outputs[0].token_ids
    assert result.finish_reasons == ["length"]


def test_bf16_on_cpu_stays_within_tolerance_of_torch_bf16(tiny_qwen3):
    model = folojax.load_model(tiny_qwen3.path, dtype="bfloat16", load_tokenizer=False)
    ids = random_ids(30, seed=8, batch=2)
    # A copy: the shared fixture's float32 weights must not go through bfloat16 and back.
    torch_bf16 = copy.deepcopy(tiny_qwen3.torch_model).to(torch.bfloat16)
    with torch.no_grad():
        reference = torch_bf16(torch.tensor(ids)).logits.float().numpy()
    scale = np.abs(reference).max()
    ours = np.asarray(folojax.forward(model.params, model.config, ids), np.float32)
    assert np.abs(ours - reference).max() <= BF16_RELATIVE_TOLERANCE * scale
    # The paged step (bf16 cache, the gather path) agrees with the dense forward.
    cache = folojax.init_cache(model.config, batch_size=2, max_seq_len=64, dtype=model.dtype)
    logits, _ = folojax.prefill(model.params, cache, ids, [30, 30], model.config)
    assert np.abs(np.asarray(logits) - reference[:, -1]).max() <= BF16_RELATIVE_TOLERANCE * scale


def test_abort_in_the_middle_of_a_chunked_prefill_returns_every_block(tiny_qwen3):
    llm = make_llm(tiny_qwen3, block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    engine, pool = llm.llm_engine, llm.llm_engine.kv_cache_manager.pool
    engine.add_request("long", random_ids(100, seed=9),
                       folojax.SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    engine.step()
    request = engine.scheduler.running[0]
    assert 0 < request.num_computed_tokens < 100  # mid-prefill
    engine.abort_request("long")
    assert pool.num_free_blocks == 64
    while engine.has_unfinished_requests():
        assert engine.step() == []
    assert pool.num_free_blocks == 64 and engine.get_num_unfinished_requests() == 0


def test_abort_after_an_n_fork_returns_every_block(tiny_qwen3):
    llm = make_llm(tiny_qwen3, block_size=4, num_kv_blocks=64)
    engine, pool = llm.llm_engine, llm.llm_engine.kv_cache_manager.pool
    engine.add_request("wide", random_ids(10, seed=10),
                       folojax.SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=20,
                                              ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert len(engine.scheduler.running) == 3  # forked
    engine.abort_request("wide")
    assert pool.num_free_blocks == 64
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.num_free_blocks == 64


@pytest.mark.real_model
def test_a_stop_string_spanning_token_boundaries_cuts_the_text(smollm2):
    prompt = "Count: one, two,"
    greedy = folojax.SamplingParams(temperature=0, max_tokens=24)
    completion = smollm2.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
    tokenizer = smollm2.get_tokenizer()
    pieces = [tokenizer.decode([t]) for t in completion.token_ids]
    # A stop string made of the end of one token and the start of the next, found first there.
    boundaries = [(len("".join(pieces[:i + 1])), pieces[i][-2:] + pieces[i + 1][:1])
                  for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1]]
    index, stop = next((end - 2, stop) for end, stop in boundaries
                       if completion.text.find(stop) == end - 2)
    stopped = smollm2.generate([prompt], folojax.SamplingParams(
        temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.text == completion.text[:index]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop


@pytest.mark.real_model
def test_chat_takes_openai_content_parts_and_names_a_message_without_content(smollm2):
    greedy = folojax.SamplingParams(temperature=0, max_tokens=8)
    plain = smollm2.chat([{"role": "user", "content": "Hi there.\nHow are you?"}], greedy,
                         use_tqdm=False)[0]
    parts = smollm2.chat([{"role": "user", "content": [
        {"type": "text", "text": "Hi there."}, {"type": "text", "text": "How are you?"}]}],
        greedy, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids
    assert parts.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match=r"message 1 \(user\) has no 'content'"):
        smollm2.chat([{"role": "system", "content": "Be brief."}, {"role": "user"}], greedy)
    with pytest.raises(ValueError, match="content part 0 must be"):
        smollm2.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                     greedy)
    assert smollm2.chat([{"role": "user", "content": "Hi"}], greedy,
                        use_tqdm=False)[0].outputs[0].token_ids
