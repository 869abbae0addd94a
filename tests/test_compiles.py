"""Bucketed shapes keep compilation to a handful of traces."""

import jax
import pytest

import folojax
from folojax.runner.buckets import stepped_bucket
from folojax.runner.model_runner import PADDED_STEPS_BEFORE_COMPILE, wait_for_background_compiles
from folojax.runner.prepare import prefill_token_bucket, rows_bucket


def test_prompts_of_1_to_1000_tokens_compile_a_handful_of_times(tiny_qwen3):
    model = tiny_qwen3.model
    sampling = folojax.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before = folojax.num_compiles("paged_step")
    for length in (1, 2, 7, 15, 16, 17, 33, 100, 130, 255, 256, 257, 600, 999, 1000):
        cache = folojax.init_cache(model.config, batch_size=1, max_seq_len=1024)
        result = folojax.generate(model.params, cache, jax.random.key(0),
                                  [3 + (i % 300) for i in range(length)], config=model.config,
                                  sampling=sampling)
        assert len(result.token_ids[0]) == 3
    # Prompt buckets 16..1024 (7) plus at most one decode shape per attended-length bucket
    # (256, 512, 1024): far fewer than the 15 lengths, let alone one per length.
    assert folojax.num_compiles("paged_step") - before <= 10


def test_stepped_buckets_are_linear_then_geometric():
    assert [stepped_bucket(n, 8) for n in (0, 1, 8, 9, 63, 64, 65, 128, 129, 300)] == [
        0, 8, 8, 16, 64, 64, 128, 128, 256, 512]
    assert [stepped_bucket(n, 128) for n in (1, 1000, 1025, 2049)] == [128, 1024, 2048, 4096]


def test_few_sampling_rows_pad_to_powers_of_two_then_to_multiples_of_8():
    assert [rows_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 48, 65)] == [
        0, 1, 2, 4, 8, 8, 16, 48, 128]
    # Beside a prefill: powers of two.
    assert [rows_bucket(n, coarse=True) for n in (0, 1, 3, 9, 17, 24, 33, 48)] == [
        0, 1, 4, 16, 32, 32, 64, 64]


def test_short_prefills_pad_to_multiples_of_32_longer_ones_to_128():
    assert [prefill_token_bucket(n) for n in (0, 1, 24, 33, 128, 129, 1000, 1025)] == [
        0, 32, 32, 64, 128, 256, 1024, 2048]


def test_each_logprobs_n_is_no_compile_of_its_own(tiny_qwen3):
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")
    prompt = {"prompt_token_ids": [5, 6, 7]}
    llm.generate(prompt, folojax.SamplingParams(temperature=0, max_tokens=3, logprobs=1),
                 use_tqdm=False)
    before = folojax.num_compiles("paged_step")
    for n in range(1, 21):
        [output] = llm.generate(prompt, folojax.SamplingParams(temperature=0, max_tokens=3,
                                                               logprobs=n), use_tqdm=False)
        assert all(len(step) in (n, n + 1) for step in output.outputs[0].logprobs)
    # N rounds up to 1, 2, 4, 8, 16, 32: at most two shapes per bucket (prefill, decode) more.
    assert folojax.num_compiles("paged_step") - before <= 10
    with pytest.raises(ValueError, match="logprobs=21 exceeds max_logprobs=20"):
        llm.generate(prompt, folojax.SamplingParams(logprobs=21))


def test_a_prefill_step_without_decodes_shares_the_next_steps_shape(tiny_qwen3):
    from folojax.engine.kv_cache_manager import KVCacheManager
    from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput
    from folojax.ops.paged_attention import CPU_KERNEL_CHUNKS
    from folojax.runner.prepare import build_step
    from tests.test_block_pool import make_request

    manager = KVCacheManager(num_blocks=16, block_size=16)
    prompt, decoding = make_request("p", list(range(3, 40))), make_request("d", [5, 6])
    for request in (prompt, decoding):
        manager.allocate_slots(request, request.num_tokens)
    tables = {r.request_id: manager.block_ids(r.request_id) for r in (prompt, decoding)}
    chunks = CPU_KERNEL_CHUNKS

    def shapes(scheduled):
        batch = build_step(SchedulerOutput(scheduled, [], []), tables, 16, 256, 320, (), chunks)
        return jax.tree.map(lambda a: a.shape, (batch.inputs, batch.sampler))

    # The same sampling rows (the prompt's), with and without a decode row beside the prefill.
    alone = shapes([ScheduledRequest(prompt, 37, 0, True)])
    beside = shapes([ScheduledRequest(decoding, 1, 1, False), ScheduledRequest(prompt, 37, 0,
                                                                              True)])
    assert alone == beside


def _record_step_rows(monkeypatch) -> list[int]:
    """Patches the runner's jitted step to record each dispatched step's flat token count."""
    from folojax.runner import model_runner

    dispatched, step = [], model_runner.paged_step

    def recording(params, cache, inputs, *args, **kwargs):
        dispatched.append(inputs.token_ids.shape[0])
        return step(params, cache, inputs, *args, **kwargs)

    recording.lower = step.lower  # background compiles
    monkeypatch.setattr(model_runner, "paged_step", recording)
    return dispatched


def _greedy(n):
    return folojax.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


PROMPTS = [{"prompt_token_ids": [3 + i, 4, 5, 6]} for i in range(8)]
LENGTHS = [2 + 2 * i for i in range(8)]  # the requests finish one after another


def _wave_then_one_request(tiny_qwen3, monkeypatch, **engine_args):
    """Runs 8 requests that finish one after another, then the first one alone for
    PADDED_STEPS_BEFORE_COMPILE + 4 tokens; returns (llm, dispatched token counts of the lone
    request's steps, the reference tokens of each request alone)."""
    alone = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")
    expected = [alone.generate(p, _greedy(n), use_tqdm=False)[0].outputs[0].token_ids
                for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    expected.append(alone.generate(PROMPTS[0], _greedy(PADDED_STEPS_BEFORE_COMPILE + 4),
                                   use_tqdm=False)[0].outputs[0].token_ids)
    dispatched = _record_step_rows(monkeypatch)
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                      enable_prefix_caching=False, **engine_args)
    outputs = llm.generate(PROMPTS, [_greedy(n) for n in LENGTHS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected[:-1]
    # One prefill step (8 rows + 32 prompt tokens), then decodes of 8 down to 1 request, which
    # all run at the 8 rows compiled first (buckets 4, 2 and 1 are not compiled).
    assert dispatched[0] == 8 + 32
    assert set(dispatched[1:]) == {8} and len(dispatched) >= LENGTHS[-1]
    dispatched.clear()
    [output] = llm.generate(PROMPTS[0], _greedy(PADDED_STEPS_BEFORE_COMPILE + 4),
                            use_tqdm=False)
    assert output.outputs[0].token_ids == expected[-1]
    # Its prefill runs at the 8-request prefill's shape (no more than twice its own tokens),
    # its decodes at 8 rows, then (maybe) at their own 1 row once that shape has recurred enough.
    decodes = dispatched[1:]
    assert dispatched[0] == 8 + 32 and decodes[0] == 8
    assert decodes == sorted(decodes, reverse=True) and set(decodes) <= {8, 1}
    return llm, decodes, expected


def test_a_shape_that_recurs_compiles_where_it_is_dispatched_without_background_compiles(
        tiny_qwen3, monkeypatch):
    _, decodes, _ = _wave_then_one_request(tiny_qwen3, monkeypatch, background_compile=False)
    # Counting the first call's, the 1-row decode has come back PADDED_STEPS_BEFORE_COMPILE
    # times by then, and compiles at once.
    assert 1 in decodes and decodes.count(8) <= PADDED_STEPS_BEFORE_COMPILE


def test_a_shape_that_recurs_compiles_in_the_background_and_then_runs_at_its_own_size(
        tiny_qwen3, monkeypatch):
    llm, _, expected = _wave_then_one_request(tiny_qwen3, monkeypatch)
    runner = llm.llm_engine.runner
    assert runner.num_dispatch_compiles == 2  # the 8-row prefill and decode: nothing covered them
    runner.wait_for_compiles()
    wait_for_background_compiles()  # other tests' runners' too, which would count
    traced = folojax.num_compiles("paged_step")
    dispatched = _record_step_rows(monkeypatch)
    [again] = llm.generate(PROMPTS[0], _greedy(PADDED_STEPS_BEFORE_COMPILE + 4), use_tqdm=False)
    # The decodes run at the 1 row compiled in the background, which jit does not trace again;
    # the prefill, met twice, still at the 8-request prefill's shape.
    assert dispatched == [8 + 32] + [1] * (PADDED_STEPS_BEFORE_COMPILE + 3)
    assert folojax.num_compiles("paged_step") == traced
    assert again.outputs[0].token_ids == expected[-1] and runner.num_dispatch_compiles == 2


def test_a_server_compiles_every_covered_shape_it_meets_in_the_background(tiny_qwen3,
                                                                          monkeypatch):
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                      enable_prefix_caching=False, padded_steps_before_compile=1)
    llm.generate(PROMPTS, [_greedy(n) for n in LENGTHS], use_tqdm=False)
    llm.llm_engine.runner.wait_for_compiles()
    dispatched = _record_step_rows(monkeypatch)
    # The wave's tail (4, 2, 1 requests) compiled the 1-row decode: a lone request decodes at
    # its own size at once (its prefill, new, runs at the wave's).
    llm.generate(PROMPTS[0], _greedy(4), use_tqdm=False)
    assert dispatched == [8 + 32, 1, 1, 1]


def test_a_failed_background_compile_warns_and_the_step_compiles_at_dispatch(
        tiny_qwen3, monkeypatch, caplog):
    from folojax.runner import model_runner

    def failing(*args):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(model_runner, "_compile_step", failing)
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                      enable_prefix_caching=False, padded_steps_before_compile=1)
    runner = llm.llm_engine.runner
    llm.generate(PROMPTS, [_greedy(n) for n in LENGTHS], use_tqdm=False)  # the tail: padded
    runner.wait_for_compiles()
    assert "a background compile of paged_step failed (RuntimeError: no compiler today)" in (
        caplog.text)
    # Beside the 8-row prefill and decode (nothing covered them), the tail's shapes compiled
    # where they ran once their background compile had failed; a lone request's decodes then
    # run at their own 1 row.
    assert runner.num_dispatch_compiles > 2
    dispatched = _record_step_rows(monkeypatch)
    [output] = llm.generate(PROMPTS[0], _greedy(4), use_tqdm=False)
    assert dispatched[1:] == [1, 1, 1]
    assert output.outputs[0].token_ids == folojax.LLM(
        tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32").generate(
        PROMPTS[0], _greedy(4), use_tqdm=False)[0].outputs[0].token_ids
