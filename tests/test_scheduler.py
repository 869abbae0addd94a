"""The scheduler, with no device: token budget, chunked prefill, decodes beside a long prefill,
preemption when the pool runs out, abort, and async scheduling (a step scheduled while the one
before it is in flight)."""

import numpy as np

from folojax.config import SchedulerConfig
from folojax.engine.kv_cache_manager import KVCacheManager
from folojax.engine.request import Request, RequestStatus
from folojax.engine.scheduler import Scheduler
from folojax.sampling_params import SamplingParams
from tests.test_block_pool import make_request


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_num_seqs=8, chunked=True):
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching=False))


def run_step(scheduler, token=7):
    """Schedules one step and feeds back `token` for every request that samples."""
    output = scheduler.schedule()
    sampled = {s.request.request_id: [(token, None)] for s in output.scheduled if s.samples}
    finished = scheduler.update(output, sampled, make_children=lambda parent: [])
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}, output, finished


def test_long_prompt_is_chunked_to_the_token_budget():
    scheduler = make_scheduler(budget=16)
    request = make_request("long", list(range(40)), max_tokens=2)
    scheduler.add_request(request)
    assert run_step(scheduler)[0] == {"long": 16}
    assert request.num_computed_tokens == 16 and request.output_token_ids == []
    assert run_step(scheduler)[0] == {"long": 16}
    assert run_step(scheduler)[0] == {"long": 8}  # completes the prompt and samples
    assert request.output_token_ids == [7]
    assert run_step(scheduler)[0] == {"long": 1}
    assert request.finished and request.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_budget_is_shared_and_never_exceeded():
    scheduler = make_scheduler(budget=10)
    for i in range(3):
        scheduler.add_request(make_request(str(i), list(range(6)), max_tokens=3))
    while scheduler.has_unfinished_requests():
        counts, output, _ = run_step(scheduler)
        assert 0 < output.num_scheduled_tokens <= 10
    # First step: request 0 whole (6) and 4 tokens of request 1.
    scheduler = make_scheduler(budget=10)
    for i in range(3):
        scheduler.add_request(make_request(str(i), list(range(6)), max_tokens=3))
    assert run_step(scheduler)[0] == {"0": 6, "1": 4}
    assert run_step(scheduler)[0] == {"0": 1, "1": 2, "2": 6}


def test_running_decodes_are_scheduled_beside_a_long_prefill():
    scheduler = make_scheduler(budget=16)
    decoders = [make_request(f"d{i}", [1, 2, 3], max_tokens=20) for i in range(3)]
    for request in decoders:
        scheduler.add_request(request)
    run_step(scheduler)
    scheduler.add_request(make_request("long", list(range(100)), max_tokens=2))
    for _ in range(5):
        counts, _, _ = run_step(scheduler)
        assert counts == {"d0": 1, "d1": 1, "d2": 1, "long": 13}


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(budget=16, chunked=False)
    scheduler.add_request(make_request("a", list(range(10)), max_tokens=5))
    scheduler.add_request(make_request("b", list(range(10)), max_tokens=5))
    assert run_step(scheduler)[0] == {"a": 10}
    assert run_step(scheduler)[0] == {"a": 1, "b": 10}


def test_max_num_seqs_counts_the_children_a_request_will_fork():
    scheduler = make_scheduler(max_num_seqs=4)
    scheduler.add_request(make_request("a", [1, 2], n=3))
    scheduler.add_request(make_request("b", [1, 2]))
    scheduler.add_request(make_request("c", [1, 2]))
    assert set(run_step(scheduler)[0]) == {"a", "b"}


def test_pool_exhaustion_preempts_the_latest_request_which_resumes_with_its_tokens():
    # 6 blocks of 4 tokens; each request needs 2 blocks for its prompt and grows by decoding.
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    requests = [make_request(str(i), [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=6) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    run_step(scheduler)
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 0
    assert [r.output_token_ids for r in requests] == [[7], [7], [7]]
    # Each now needs a third block for position 8: request 2 (the latest) is preempted.
    counts, output, _ = run_step(scheduler)
    assert counts == {"0": 1, "1": 1} and output.preempted == [requests[2]]
    assert requests[2].status == RequestStatus.PREEMPTED and requests[2].num_computed_tokens == 0
    assert scheduler.kv_cache_manager.block_ids("2") == []
    while scheduler.has_unfinished_requests():
        run_step(scheduler)
    assert requests[2].num_preemptions >= 1
    assert [r.output_token_ids for r in requests] == [[7] * 6] * 3
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 6


def test_abort_frees_the_blocks_at_once():
    scheduler = make_scheduler(num_blocks=10)
    request = make_request("a", list(range(12)), max_tokens=50)
    scheduler.add_request(request)
    run_step(scheduler)
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 7
    assert scheduler.abort_request("a") is request
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 10
    assert not scheduler.has_unfinished_requests()
    assert scheduler.abort_request("a") is None


def feed(scheduler, output, token=7):
    """Reads one scheduled step's tokens back: `token` for every request that samples."""
    sampled = {s.request.request_id: [(token, None)] for s in output.scheduled if s.samples}
    return scheduler.update(output, sampled, make_children=lambda parent: [])


def counts(output) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}


def test_async_scheduling_counts_the_tokens_in_flight():
    """Step N+1 is scheduled before step N's tokens are read back: the token in flight is a
    placeholder, and a request whose last token is in flight gets nothing more."""
    scheduler = make_scheduler()
    request = make_request("a", [1, 2, 3, 4, 5], max_tokens=3)
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert counts(first) == {"a": 5} and request.num_output_placeholders == 1
    second = scheduler.schedule()  # decodes the token the first step samples
    assert counts(second) == {"a": 1} and second.scheduled[0].start == 5
    assert request.num_computed_tokens == 6 and request.num_output_placeholders == 2
    feed(scheduler, first)
    assert request.output_token_ids == [7] and request.num_output_placeholders == 1
    third = scheduler.schedule()
    feed(scheduler, second)
    assert counts(third) == {"a": 1}
    assert scheduler.schedule().scheduled == []  # its third and last token is in flight
    assert feed(scheduler, third) == [request]
    assert request.output_token_ids == [7, 7, 7] and request.status == (
        RequestStatus.FINISHED_LENGTH)
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_async_scheduling_drops_the_token_computed_past_a_stop():
    scheduler = make_scheduler()
    sampling = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[9])
    request = Request("a", [1, 2, 3], sampling, np.zeros(2, np.uint32), max_total_len=10_000)
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()
    feed(scheduler, first, token=5)
    third = scheduler.schedule()  # scheduled before the stop token is seen
    assert feed(scheduler, second, token=9) == [request]
    assert feed(scheduler, third, token=6) == []  # its token is dropped
    assert request.output_token_ids == [5, 9] and request.finish_reason == "stop"
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_a_request_preempted_with_its_first_token_in_flight_forks_into_the_queue():
    # 4 blocks of 4 tokens: "b" (4 tokens) and "a" (11 tokens, n=2) fill the pool in step 1.
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=16)
    b = make_request("b", [1, 2, 3, 4], max_tokens=2)
    a = make_request("a", list(range(11)), max_tokens=2, n=2)
    scheduler.add_request(b)
    scheduler.add_request(a)
    first = scheduler.schedule()
    assert counts(first) == {"b": 4, "a": 11}
    # Before step 1 is read back, b needs a block for its first output: a is preempted.
    second = scheduler.schedule()
    assert counts(second) == {"b": 1} and second.preempted == [a]
    assert a.status == RequestStatus.PREEMPTED and a.num_output_placeholders == 1
    child = make_request("a-child", list(range(11)), max_tokens=2)
    sampled = {"b": [(7, None)], "a": [(8, None)]}
    scheduler.update(first, sampled, make_children=lambda parent: [child])
    # a keeps its token; its child waits behind it, to compute the prompt itself.
    assert a.output_token_ids == [8] and a.num_output_placeholders == 0
    assert list(scheduler.waiting) == [a, child]
    in_flight = second
    for _ in range(20):
        output = scheduler.schedule()
        if in_flight is not None:
            feed(scheduler, in_flight)
        in_flight = output if output.scheduled else None
    assert not scheduler.has_unfinished_requests() and in_flight is None
    assert [r.output_token_ids for r in (b, a, child)] == [[7, 7], [8, 7], [7, 7]]
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 4


def test_decode_steps_run_while_all_decode_and_none_waits():
    """num_scheduler_steps=4: after the prompts, steps of 4 tokens per request, shortened to the
    fewest outputs any request may still produce; the tokens past a stop are dropped."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, num_scheduler_steps=4)
    scheduler = Scheduler(config, KVCacheManager(64, 4, enable_prefix_caching=False))
    a, b = (make_request(name, [1, 2, 3], max_tokens=n) for name, n in (("a", 10), ("b", 7)))
    for request in (a, b):
        scheduler.add_request(request)
    prompts = scheduler.schedule()
    assert prompts.num_steps == 1
    feed(scheduler, prompts)
    steps = []
    for _ in range(10):
        if not scheduler.has_unfinished_requests():
            break
        output = scheduler.schedule()
        steps.append(output.num_steps)
        assert all(s.num_new_tokens == 1 and s.samples for s in output.scheduled)
        tokens = [(7, None)] * output.num_steps
        scheduler.update(output, {s.request.request_id: tokens for s in output.scheduled},
                         make_children=lambda parent: [])
    # b: 1 + 4 + 2 outputs; a, alone then, the 3 it has left
    assert steps == [4, 2, 3]
    assert (a.num_output_tokens, b.num_output_tokens) == (10, 7) and a.finished and b.finished
    assert scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_decode_steps_fall_back_to_single_steps():
    """A waiting request (here: no room to admit it), a prompt still computing, or a pool too
    small for the steps' tokens: a single step."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, num_scheduler_steps=4)
    scheduler = Scheduler(config, KVCacheManager(64, 4, enable_prefix_caching=False))
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=20))
    scheduler.add_request(make_request("b", [1, 2], max_tokens=20))
    feed(scheduler, scheduler.schedule())
    assert scheduler.schedule().num_steps == 1  # b waits
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, num_scheduler_steps=4)
    scheduler = Scheduler(config, KVCacheManager(2, 4, enable_prefix_caching=False))
    request = make_request("c", [1, 2, 3], max_tokens=20)
    scheduler.add_request(request)
    feed(scheduler, scheduler.schedule())  # 3 prompt tokens + 1 output: block 1 full
    output = scheduler.schedule()  # 4 tokens would need positions 3..6: 2 blocks, both free
    assert output.num_steps == 4
    feed_tokens = {"c": [(7, None)] * 4}
    scheduler.update(output, feed_tokens, make_children=lambda parent: [])
    # 8 tokens now, 7 computed: 4 more would need a third block; one more fits
    output = scheduler.schedule()
    assert output.num_steps == 1 and counts(output) == {"c": 1}
