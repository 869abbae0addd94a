"""EngineCore: the step loop shared by LLMEngine and folojax.generate — schedule, then
runner.execute, then update the requests with the tokens read back.

With async scheduling each call schedules and dispatches the next step before it reads back the
tokens of the step before, so the host builds step N+1 while the device runs step N, and the
device never waits for the host in between. A token that is not read back yet is taken on the
device from the step in flight (StepInputs.token_sources, SamplerInputs.output_sources).
"""

from __future__ import annotations

from collections.abc import Callable

from folojax.config import SchedulerConfig
from folojax.engine.request import Request, read_prompt_logprobs, read_sampled
from folojax.engine.scheduler import Scheduler
from folojax.runner.model_runner import ModelRunner, StepResult


def no_children(request: Request) -> list[Request]:
    raise ValueError(f"request {request.request_id} asks for n={request.sampling.n} "
                     "completions, and this engine core makes one per request")


class EngineCore:
    def __init__(self, runner: ModelRunner, kv_cache_manager, config: SchedulerConfig,
                 make_children: Callable[[Request], list[Request]] = no_children):
        self.runner = runner
        self.kv_cache_manager = kv_cache_manager
        self.scheduler = Scheduler(config, kv_cache_manager)
        self.async_scheduling = config.async_scheduling
        self.make_children = make_children
        self._in_flight: StepResult | None = None  # dispatched, tokens not read back yet

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finishes the request as aborted; its blocks return to the pool at once."""
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[Request]:
        """Runs one step; returns the requests whose next token was read back in this call (in
        their sampling order; finished ones included). With async scheduling those are the
        previous call's step's, and the first call returns none. A request that finishes in
        step N has computed one more token in step N+1; it is dropped. A step of several tokens
        per request (num_scheduler_steps) is read back in the call that dispatches it, after the
        step before it."""
        previous, self._in_flight = self._in_flight, None
        current = self._dispatch(previous)
        advanced = self._finish(previous) if previous is not None else []
        if current is not None and self.async_scheduling and current.output.num_steps == 1:
            self._in_flight = current
        elif current is not None:
            advanced = list(dict.fromkeys(advanced + self._finish(current)))
        return advanced

    def _dispatch(self, previous: StepResult | None) -> StepResult | None:
        """Schedules a step and dispatches it without waiting for it; None if nothing can be
        scheduled."""
        output = self.scheduler.schedule()
        if not output.scheduled:
            if previous is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no waiting request fits in an empty KV cache pool; "
                                   "requests should have been rejected when added")
            return None
        tables = {s.request.request_id: self.kv_cache_manager.block_ids(s.request.request_id)
                  for s in output.scheduled}
        return self.runner.execute(output, tables, previous)

    def _finish(self, step: StepResult) -> list[Request]:
        """Reads a dispatched step's tokens back (waiting for it) and advances its requests."""
        requests = step.batch.sampling_requests
        sampled = dict(zip((r.request_id for r in requests),
                           read_sampled(step.tokens, step.logprobs,
                                        [r.sampling.logprobs for r in requests],
                                        step.output.num_steps),
                           strict=True))
        if step.prompt_logprobs is not None:
            read_prompt_logprobs(step.batch.prompt_logprob_entries, step.prompt_logprobs)
        self.scheduler.update(step.output, sampled, self.make_children)
        return requests
