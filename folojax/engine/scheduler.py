"""The scheduler: one rule for prefill and decode, as in vLLM v1.

Each request has computed `num_computed_tokens` of its tokens (prompt + outputs). Every step
gives each running request, in admission order, the tokens it still needs (a whole decode token,
or the next chunk of a prompt) until the token budget is spent, then admits waiting requests while
the budget, max_num_seqs and the block pool allow. When the pool runs out, the most recently
admitted running request is preempted: its blocks are freed and it is recomputed later from its
prompt and the tokens it already produced. The output is plain data; nothing here touches a device.

Scheduling a step counts its tokens as computed at once, and a token it samples as a placeholder,
so the next step can be scheduled before this one's tokens are read back (async scheduling): a
decode row then takes its input token from the step in flight. `update` reads the tokens in.

With num_scheduler_steps = k > 1, a step in which every running request decodes and none waits
computes up to k tokens per request in one dispatch (each row feeds its sampled token back on the
device), and counts them all as computed and in flight at once.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from folojax.config import SchedulerConfig
from folojax.engine.kv_cache_manager import BlockCopy, KVCacheManager
from folojax.engine.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # computed this step, from position `start` on
    start: int  # the request's num_computed_tokens when it was scheduled
    samples: bool  # this step computes all its tokens, so it yields the next one


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    block_copies: list[BlockCopy]  # copy-on-write, performed on the device before the step
    preempted: list[Request]
    # Tokens each request computes and samples: 1, or for a step of decodes alone up to
    # num_scheduler_steps (each scheduled request then has one input token, and samples).
    num_steps: int = 1

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # over the scheduler's lifetime

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_request(self, request_id: str) -> Request | None:
        """Finishes the request as aborted and frees its blocks at once; None if unknown."""
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self.kv_cache_manager.free(request)
                    request.status = RequestStatus.FINISHED_ABORTED
                    return request
        return None

    def schedule(self) -> SchedulerOutput:
        copies: list[BlockCopy] = []
        decode_steps = self._schedule_decode_steps(copies)
        if decode_steps is not None:
            return decode_steps
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.finishes_in_flight:
                index += 1
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          budget)
            result = self.kv_cache_manager.allocate_slots(request, num_new)
            while result is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
                result = self.kv_cache_manager.allocate_slots(request, num_new)
            if result is None:
                break
            copies += result
            scheduled.append(_schedule(request, num_new))
            budget -= num_new
            index += 1
        if not preempted:  # a pool that just ran out admits nobody new
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, copies, preempted)

    def _schedule_decode_steps(self, copies: list[BlockCopy]) -> SchedulerOutput | None:
        """A step of several decode tokens per request (num_scheduler_steps), if every running
        request decodes, none waits or forks, each may produce two more outputs at least, and
        the pool holds their tokens without a preemption; else None. The step's length is the
        fewest outputs any of them may still produce, up to num_scheduler_steps. `copies` gets
        the block copies of the slots allocated, even when it returns None."""
        if self.config.num_scheduler_steps == 1 or self.waiting:
            return None
        requests = [r for r in self.running if not r.finishes_in_flight]
        if not requests or len(requests) > self.config.max_num_batched_tokens or any(
                r.num_tokens_with_placeholders - r.num_computed_tokens != 1
                or r.num_output_placeholders > 1 or r.num_children_to_fork for r in requests):
            return None
        num_steps = min(self.config.num_scheduler_steps,
                        *(r.num_outputs_left for r in requests))
        if num_steps < 2:
            return None
        for request in requests:
            result = self.kv_cache_manager.allocate_slots(request, num_steps)
            if result is None:
                return None
            copies += result
        return SchedulerOutput([_schedule(r, 1, num_steps) for r in requests], copies, [],
                               num_steps)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if request.num_output_placeholders:  # preempted with a token in flight
                break
            if self._num_seqs_after_forks() + 1 + request.num_children_to_fork > (
                    self.config.max_num_seqs):
                break
            computed_blocks, num_cached = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.perf_counter()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(_schedule(request, num_new))
            budget -= num_new
        return budget

    def _num_seqs_after_forks(self) -> int:
        return sum(1 + r.num_children_to_fork for r in self.running)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput,
               sampled: dict[str, list[tuple[int, dict | None]]],
               make_children: Callable[[Request], list[Request]]) -> list[Request]:
        """Reads a step's sampled tokens in (`sampled`: request id -> its output.num_steps
        (token, logprobs) pairs), offers newly full blocks to the prefix cache, and forks
        requests whose prompt just completed. Returns the requests that finished. A request that
        finished or was aborted after the step was scheduled drops its tokens, and one that
        finishes at a token drops those after it."""
        finished = []
        for item in output.scheduled:
            request = item.request
            if request.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.kv_cache_manager.cache_blocks(request)
            if not item.samples:
                continue
            if request.num_children_to_fork:
                self._fork(request, make_children(request))
            for token in sampled[request.request_id]:
                request.num_output_placeholders -= 1
                request.append_token(*token)
                if request.finished:  # running, or waiting if preempted with a token in flight
                    (self.running if request in self.running else self.waiting).remove(request)
                    self.kv_cache_manager.free(request)
                    finished.append(request)
                    break
        return finished

    def _fork(self, parent: Request, children: list[Request]) -> None:
        """Children share the parent's prompt blocks; each recomputes the last prompt token
        (into a copy of its block, if shared) to sample its own first token. A parent preempted
        while its first token was in flight has no blocks: its children wait, like it."""
        parent.num_children_to_fork = 0
        if parent.status != RequestStatus.RUNNING:
            position = self.waiting.index(parent) + 1
            for offset, child in enumerate(children):
                self.waiting.insert(position + offset, child)
            return
        for child in children:
            child.num_computed_tokens = parent.num_prompt_tokens - 1
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            child.status = RequestStatus.RUNNING
            self.kv_cache_manager.fork(parent, child, child.num_computed_tokens)
            self.running.append(child)


def _schedule(request: Request, num_new_tokens: int, num_steps: int = 1) -> ScheduledRequest:
    """Schedules the request's next tokens; they count as computed from now on, and the tokens
    the step samples as placeholders until they are read back. A step of num_steps > 1 decodes
    (num_new_tokens 1) that many tokens, each sampled one the input of the next."""
    start = request.num_computed_tokens
    samples = start + num_new_tokens == request.num_tokens_with_placeholders
    request.num_computed_tokens += num_new_tokens + num_steps - 1
    request.num_output_placeholders += samples * num_steps
    return ScheduledRequest(request, num_new_tokens, start, samples)
