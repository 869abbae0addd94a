"""LLMEngine's step API: add_request validation, abort, streaming outputs, pool sizing,
and a bounded number of compiles."""

import logging

import numpy as np
import pytest

import folojax
from folojax.ops.paged_kv_cache import cache_bytes_per_token

GREEDY = folojax.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def make_llm(tiny_qwen3, **kwargs) -> folojax.LLM:
    return folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32", **kwargs)


def run_to_completion(engine) -> dict[str, folojax.RequestOutput]:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def test_requests_that_can_never_run_are_rejected_at_add_request(tiny_qwen3):
    llm = make_llm(tiny_qwen3, block_size=8, num_kv_blocks=4, max_model_len=64, max_num_seqs=2)
    engine = llm.llm_engine
    engine.add_request("ok", [5, 6, 7], GREEDY)
    with pytest.raises(ValueError, match=r"has 40 tokens but the KV cache pool holds 32 "
                                         r"\(num_kv_blocks=4 x block_size=8\)"):
        engine.add_request("too-big-for-pool", list(range(3, 43)), GREEDY)
    with pytest.raises(ValueError, match="70 tokens but max_model_len leaves room for 64"):
        engine.add_request("too-long", [3] * 70, GREEDY)
    with pytest.raises(ValueError, match="n=3 exceeds max_num_seqs=2"):
        engine.add_request("wide", [3, 4], folojax.SamplingParams(n=3))
    with pytest.raises(ValueError, match="request_id 'ok' is already in use"):
        engine.add_request("ok", [3, 4], GREEDY)
    with pytest.raises(TypeError, match="expected SamplingParams"):
        engine.add_request("bad", [3, 4], {"temperature": 0})
    assert engine.get_num_unfinished_requests() == 1
    finished = run_to_completion(engine)
    assert list(finished) == ["ok"]
    alone = make_llm(tiny_qwen3).generate({"prompt_token_ids": [5, 6, 7]}, GREEDY,
                                          use_tqdm=False)[0]
    assert finished["ok"].outputs[0].token_ids == alone.outputs[0].token_ids


def test_abort_returns_blocks_at_once_and_the_others_finish(tiny_qwen3):
    llm = make_llm(tiny_qwen3, block_size=4, num_kv_blocks=64)
    engine = llm.llm_engine
    pool = engine.kv_cache_manager.pool
    engine.add_request("keep", [5, 6, 7, 8, 9], GREEDY)
    engine.add_request("drop", list(range(3, 40)),
                       folojax.SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert pool.num_free_blocks == 64 - 2 - 10
    engine.abort_request("drop")
    assert pool.num_free_blocks == 64 - 2
    finished = run_to_completion(engine)
    assert list(finished) == ["keep"] and len(finished["keep"].outputs[0].token_ids) == 6
    assert pool.num_free_blocks == 64


def test_step_streams_cumulative_outputs_with_metrics(tiny_qwen3):
    engine = make_llm(tiny_qwen3).llm_engine
    engine.add_request("a", [5, 6, 7], GREEDY)
    assert engine.step() == []  # async scheduling: the first step's token is still in flight
    seen = []
    while engine.has_unfinished_requests():
        [output] = engine.step()
        seen.append(list(output.outputs[0].token_ids))
    assert seen == [seen[-1][:k] for k in range(1, 7)]
    assert output.finished and output.outputs[0].finish_reason == "length"
    metrics = output.metrics
    assert 0 <= metrics.queue_time <= metrics.ttft <= metrics.e2e_latency
    assert metrics.num_output_tokens == 6


def test_pool_is_sized_from_memory_and_logged(tiny_qwen3, caplog):
    per_block = cache_bytes_per_token(tiny_qwen3.model.config, np.float32) * 16
    with caplog.at_level(logging.INFO, logger="folojax"):
        llm = make_llm(tiny_qwen3, kv_cache_memory_bytes=per_block * 10 + 5)
    assert llm.engine_config.kv_cache.num_blocks == 10
    assert "KV cache: 10 blocks of 16 tokens = 160 tokens" in caplog.text
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=100 holds no block"):
        make_llm(tiny_qwen3, kv_cache_memory_bytes=100)
    # The default never exceeds what max_num_seqs requests of max_model_len can use.
    default = make_llm(tiny_qwen3, max_num_seqs=2, max_model_len=100)
    assert default.engine_config.kv_cache.num_blocks == 2 * 7


def test_engine_config_is_validated(tiny_qwen3):
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        make_llm(tiny_qwen3, block_size=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=64 is below max_model_len=128"):
        make_llm(tiny_qwen3, max_model_len=128, max_num_batched_tokens=64,
                 enable_chunked_prefill=False)


def test_many_mixed_requests_compile_a_bounded_number_of_times(tiny_qwen3):
    llm = make_llm(tiny_qwen3, max_num_seqs=16, max_num_batched_tokens=256)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 300, n).tolist()}
               for n in rng.integers(1, 200, 40)]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    before = folojax.num_compiles("paged_step")
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outputs)
    compiles = folojax.num_compiles("paged_step") - before
    # Buckets: decode rows {0, 8, 16} x prefill tokens {0, 32..256} x key lengths; a run over
    # 40 requests of 1-200 tokens sees a small part of the product.
    assert compiles <= 16, compiles


def test_caller_request_ids_never_collide_with_forked_completions(tiny_qwen3):
    engine = make_llm(tiny_qwen3, max_num_seqs=8).llm_engine
    sampled = folojax.SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], sampled)
    engine.add_request("a#1", [5, 6, 7], GREEDY)  # looks like a child's id; is its own request
    engine.add_request("1", [8, 9], GREEDY)
    finished = run_to_completion(engine)
    assert sorted(finished) == ["1", "a", "a#1"]
    assert len(finished["a"].outputs) == 2 and len(finished["a#1"].outputs) == 1
    assert [len(c.token_ids) for c in finished["a"].outputs] == [4, 4]
    assert engine.kv_cache_manager.pool.num_free_blocks == engine.config.kv_cache.num_blocks


def test_engine_sampling_features_match_the_functional_generate(tiny_qwen3):
    """Penalties, min_tokens, top-k/top-p and logprobs through the paged engine give what
    folojax.generate gives for the same seeded request."""
    import jax

    model = tiny_qwen3.model
    sampling = folojax.SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=11,
                                      repetition_penalty=1.3, presence_penalty=0.5,
                                      frequency_penalty=0.2, min_tokens=6, max_tokens=12,
                                      logprobs=3, stop_token_ids=[7])
    prompt = [3 + (i * 11) % 300 for i in range(37)]
    cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=128)
    expected = folojax.generate(model.params, cache, jax.random.key(0), prompt,
                                config=model.config, sampling=sampling)
    output = make_llm(tiny_qwen3, block_size=8).generate({"prompt_token_ids": prompt}, sampling,
                                                         use_tqdm=False)[0].outputs[0]
    assert output.token_ids == expected.token_ids[0]
    assert output.finish_reason == expected.finish_reasons[0]
    assert [sorted(step) for step in output.logprobs] == [sorted(step)
                                                         for step in expected.logprobs[0]]
    for ours, theirs in zip(output.logprobs, expected.logprobs[0], strict=True):
        assert all(abs(ours[t] - theirs[t]) < 1e-4 for t in ours)


def test_async_scheduling_changes_no_output(tiny_qwen3, monkeypatch):
    """Tight pool (preemption, also of requests with a token in flight), small budget (chunks),
    shared prefixes, n=3, seeded sampling that often stops early on a stop token, and a request
    with penalties (read back before the next step): the same tokens with and without async
    scheduling."""
    from folojax.engine.scheduler import Scheduler

    preempted_in_flight = []
    preempt = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, request: preempted_in_flight.append(
        request.num_output_placeholders > 0) or preempt(self, request))
    rng = np.random.default_rng(1)
    prefix = rng.integers(3, 300, 24).tolist()
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 40, 17, 9)]
    prompts += [prefix + [5, 6], prefix + [7], prompts[1]]
    samplings = [folojax.SamplingParams(temperature=1.0, seed=i, max_tokens=24,
                                        stop_token_ids=list(range(3, 60)))
                 for i in range(len(prompts))]
    samplings[2] = folojax.SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                          ignore_eos=True)
    samplings[3] = folojax.SamplingParams(temperature=0.7, seed=6, max_tokens=8,
                                          repetition_penalty=1.5, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    results = {}
    for async_scheduling in (False, True):
        preempted_in_flight.clear()
        llm = make_llm(tiny_qwen3, block_size=8, num_kv_blocks=12, max_num_batched_tokens=24,
                       max_num_seqs=6, async_scheduling=async_scheduling)
        outputs = llm.generate(requests, samplings, use_tqdm=False)
        assert llm.llm_engine.kv_cache_manager.pool.num_free_blocks == 12
        results[async_scheduling] = [[(c.token_ids, c.finish_reason) for c in o.outputs]
                                     for o in outputs]
    assert any(preempted_in_flight)  # in the async run
    assert results[True] == results[False]
    reasons = [reason for completions in results[True] for _, reason in completions]
    assert "stop" in reasons and "length" in reasons


def record_dispatches_and_reads(monkeypatch) -> list[str]:
    """The order in which the engine dispatches steps and reads their tokens back."""
    import folojax.engine.engine_core as engine_core
    import folojax.runner.model_runner as model_runner

    events = []
    dispatch, read = model_runner.paged_step, engine_core.read_sampled
    monkeypatch.setattr(model_runner, "paged_step",
                        lambda *args: events.append("dispatch") or dispatch(*args))
    monkeypatch.setattr(engine_core, "read_sampled",
                        lambda *args: events.append("read") or read(*args))
    return events


def test_async_scheduling_dispatches_a_step_before_reading_the_last(tiny_qwen3, monkeypatch):
    events = record_dispatches_and_reads(monkeypatch)
    engine = make_llm(tiny_qwen3).llm_engine
    engine.add_request("a", [5, 6, 7], GREEDY)  # 6 tokens: 6 steps
    run_to_completion(engine)
    # Every step but the first is dispatched while the one before it is still unread; nothing
    # is dispatched for the token after the last.
    assert events == ["dispatch"] + ["dispatch", "read"] * 5 + ["read"]
