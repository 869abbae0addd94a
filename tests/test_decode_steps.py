"""num_scheduler_steps: several decode tokens per request in one dispatch give the same outputs
as one step at a time (and so as transformers), and the engine falls back to single steps
wherever a multi-step step cannot run."""

import numpy as np
import pytest
import torch

import folojax
import folojax.runner.model_runner as model_runner

from .test_llm_engine import make_llm


def count_decode_steps(monkeypatch, steps_run: list | None = None) -> list[int]:
    """The num_steps of every multi-step step dispatched (and, into `steps_run`, the steps each
    ran on the device)."""
    counts = []
    dispatch = model_runner.paged_decode_steps

    def spy(params, cache, inputs, steps, *args):
        counts.append(int(steps.num_steps))
        result = dispatch(params, cache, inputs, steps, *args)
        if steps_run is not None:
            steps_run.append(int(result[-1]))
        return result

    monkeypatch.setattr(model_runner, "paged_decode_steps", spy)
    return counts


def outputs_of(llm, requests, samplings):
    outputs = llm.generate(requests, samplings, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs]


def test_multi_step_decode_changes_no_output(tiny_qwen3, monkeypatch):
    """Tight pool (preemption), small budget (chunks), shared prefixes, n=3, seeded sampling that
    often stops early on a stop token, penalties, min_tokens and logprobs; max_tokens that the
    steps do not divide: the same tokens, finish reasons and logprobs with 1 and 4 steps per
    dispatch, async scheduling on and off."""
    rng = np.random.default_rng(1)
    prefix = rng.integers(3, 300, 24).tolist()
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 40, 17, 9, 12)]
    prompts += [prefix + [5, 6], prefix + [7], prompts[1]]
    samplings = [folojax.SamplingParams(temperature=1.0, seed=i, max_tokens=23,
                                        stop_token_ids=list(range(3, 40)))
                 for i in range(len(prompts))]
    samplings[2] = folojax.SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=9,
                                          ignore_eos=True)
    samplings[3] = folojax.SamplingParams(temperature=0.7, seed=6, max_tokens=14,
                                          repetition_penalty=1.5, frequency_penalty=0.3,
                                          ignore_eos=True, logprobs=3)
    samplings[4] = folojax.SamplingParams(temperature=0.0, max_tokens=17, min_tokens=10,
                                          stop_token_ids=list(range(3, 200)))
    requests = [{"prompt_token_ids": p} for p in prompts]
    counts = count_decode_steps(monkeypatch)
    results = {}
    for steps, async_scheduling in ((1, True), (4, True), (4, False)):
        counts.clear()
        llm = make_llm(tiny_qwen3, block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
                       max_num_seqs=6, async_scheduling=async_scheduling,
                       num_scheduler_steps=steps)
        results[steps, async_scheduling] = outputs_of(llm, requests, samplings)
        assert llm.llm_engine.kv_cache_manager.pool.num_free_blocks == 14
        if steps == 1:
            assert counts == []
        else:  # multi-step steps ran, some shortened by a request's max_tokens
            assert 4 in counts and any(1 < n < 4 for n in counts)
    assert results[4, True] == results[1, True]
    assert results[4, False] == results[1, True]
    reasons = [reason for completions in results[1, True] for _, reason, _ in completions]
    assert "stop" in reasons and "length" in reasons


def test_multi_step_greedy_tokens_equal_transformers(tiny_qwen3, monkeypatch):
    """Batch of three greedy requests, 8 steps per dispatch, prompts and lengths that cross
    block boundaries inside a dispatch: transformers' greedy tokens."""
    counts = count_decode_steps(monkeypatch)
    llm = make_llm(tiny_qwen3, block_size=8, num_scheduler_steps=8)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, n).tolist() for n in (3, 13, 30)]
    sampling = folojax.SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling,
                           use_tqdm=False)
    assert 8 in counts
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = tiny_qwen3.torch_model.generate(
                torch.tensor([prompt]), max_new_tokens=21, do_sample=False,
                eos_token_id=None)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected


def test_a_waiting_request_gets_single_steps(tiny_qwen3, monkeypatch):
    """A request arriving while others decode is admitted at the next step, not after a
    multi-step run: with max_num_seqs=1 the second waits, so the first decodes one token per
    step until it finishes; alone, the second then decodes in multi-step steps."""
    counts = count_decode_steps(monkeypatch)
    engine = make_llm(tiny_qwen3, max_num_seqs=1, num_scheduler_steps=4).llm_engine
    sampling = folojax.SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], sampling)
    engine.add_request("b", [8, 9], sampling)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert [len(finished[r].outputs[0].token_ids) for r in "ab"] == [9, 9]
    assert counts == [4, 4]  # b's 8 tokens after its first; a's all single steps


def test_num_scheduler_steps_is_validated(tiny_qwen3):
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="num_scheduler_steps must be a positive int"):
            make_llm(tiny_qwen3, num_scheduler_steps=bad)


def test_the_device_loop_ends_once_every_row_has_met_a_stop_token(tiny_qwen3, monkeypatch):
    """A greedy request whose third output is a stop token: its 8-step dispatch runs 2 steps
    (its 2nd and 3rd outputs) and stops there, with single steps' outputs; beside a request
    that does not stop, the dispatch runs all 8."""
    rng = np.random.default_rng(5)
    prompt, other = rng.integers(3, 300, 11).tolist(), rng.integers(3, 300, 7).tolist()
    greedy = folojax.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = make_llm(tiny_qwen3).generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)
    tokens = alone[0].outputs[0].token_ids
    stop = tokens[2]
    assert stop not in tokens[:2]  # this seed's third token is new
    stopping = folojax.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                      stop_token_ids=[stop])
    steps_run = []
    counts = count_decode_steps(monkeypatch, steps_run)
    llm = make_llm(tiny_qwen3, num_scheduler_steps=8)
    [output] = llm.generate({"prompt_token_ids": prompt}, stopping, use_tqdm=False)
    assert output.outputs[0].token_ids == tokens[:3]
    assert output.outputs[0].finish_reason == "stop"
    assert (counts, steps_run) == ([8], [2])
    counts.clear()
    steps_run.clear()
    outputs = llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": other}],
                           [stopping, greedy], use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == tokens[:3]
    assert len(outputs[1].outputs[0].token_ids) == 20
    assert steps_run[0] == counts[0] == 8
