"""LLMEngine: the step loop of continuous batching (schedule -> build arrays -> device step ->
update), with requests added, aborted and streamed between steps.

The engine knows nothing of batches the caller made: every step runs whichever requests the
scheduler picked, over one paged KV cache that lives on the device for the engine's lifetime.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax
import numpy as np

from folojax.config import EngineConfig
from folojax.engine.generate import validate_prompt
from folojax.engine.kv_cache_manager import KVCacheManager
from folojax.engine.request import Request
from folojax.engine.scheduler import Scheduler, SchedulerOutput
from folojax.engine.sequence import Sequence, read_sampled
from folojax.engine.step_inputs import StepBatch, build_step, sampling_rows_bucket
from folojax.model.paged_step import paged_step
from folojax.ops.paged_attention import default_chunk_sizes
from folojax.ops.paged_kv_cache import copy_blocks, init_paged_cache
from folojax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folojax.sampling_params import SamplingParams
from folojax.weights.loader import Model

logger = logging.getLogger("folojax")


@dataclasses.dataclass
class _Group:
    """What the caller sees as one request: its n completions (forked after the prompt)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[Request]


@dataclasses.dataclass
class _StepInFlight:
    """A dispatched step: what was scheduled, its arrays, and its results (device arrays)."""

    output: SchedulerOutput
    batch: StepBatch
    tokens: jax.Array  # [max sampling rows]: sampling rows first
    logprobs: tuple | None


class LLMEngine:
    def __init__(self, model: Model, config: EngineConfig, seed: int = 0):
        self.model = model
        self.config = config
        cache = config.kv_cache
        self.kv_cache_manager = KVCacheManager(cache.num_blocks, cache.block_size,
                                               cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.cache = init_paged_cache(model.config, cache.num_blocks, cache.block_size,
                                      model.dtype)
        # A request never outgrows the pool: past its capacity it finishes with "length".
        self.max_request_len = min(config.max_model_len, cache.num_tokens)
        self.chunks = default_chunk_sizes(dtype=model.dtype)  # attention's kernel and chunks
        self._key = jax.random.key(seed)
        self._key_counter = itertools.count()
        self._internal_ids = itertools.count()  # completions' ids: never a caller's id
        self._groups: dict[str, _Group] = {}
        self._in_flight: _StepInFlight | None = None  # dispatched, tokens not read back yet
        # A step's tokens come back padded to the most sampling rows a step can have.
        self._no_tokens = np.zeros(sampling_rows_bucket(config.scheduler.max_num_seqs), np.int32)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", cache.num_blocks,
                    cache.block_size, cache.num_tokens)
        if cache.num_tokens < config.max_model_len:
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len=%d: longer "
                           "requests are cut at %d", cache.num_tokens, config.max_model_len,
                           cache.num_tokens)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, prompt: str | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues a request; raises (and queues nothing) if it can never run."""
        request_id = str(request_id)
        self.validate_request(request_id, prompt_token_ids, sampling_params)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        first = Request(str(next(self._internal_ids)), prompt_token_ids, sampling_params,
                        self._key_data(sampling_params.seed),
                        self._sequence(prompt_token_ids, sampling_params, arrival_time),
                        arrival_time, group_id=request_id)
        self._groups[request_id] = _Group(request_id, prompt, prompt_token_ids, [first])
        self.scheduler.add_request(first)

    def abort_request(self, request_id: str) -> None:
        """Stops the request (all its completions); their blocks return to the pool at once."""
        group = self._groups.pop(str(request_id), None)
        if group is not None:
            for request in group.completions:
                self.scheduler.abort_request(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the (cumulative) output of every request that got a token,
        finished ones included with finished=True.

        With async scheduling (the default) a call schedules and dispatches the next step
        before reading back the tokens of the step before it, so the host builds step N+1
        while the device runs step N and the device never waits for the host in between: a
        call returns the outputs of the previous call's step (the first returns none). A
        request that finishes in step N has computed one more token in step N+1; it is
        dropped. Penalties need every output token id on the host, so a step that applies them
        is read back before the next is scheduled."""
        previous, self._in_flight = self._in_flight, None
        outputs = []
        if previous is not None and previous.batch.flags.use_penalties:
            outputs, previous = self._finish(previous), None
        current = self._dispatch(previous)
        if previous is not None:
            outputs = self._finish(previous)
        if current is not None and self.config.scheduler.async_scheduling:
            self._in_flight = current
        elif current is not None:
            outputs = self._finish(current)
        return outputs

    def _dispatch(self, in_flight: _StepInFlight | None) -> _StepInFlight | None:
        """Schedules a step and dispatches it to the device without waiting for it; None if
        nothing can be scheduled."""
        output = self.scheduler.schedule()
        if not output.scheduled:
            if in_flight is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no waiting request fits in an empty KV cache pool; "
                                   "add_request should have rejected it")
            return None
        if output.block_copies:
            self.cache = copy_blocks(self.cache, *_copy_block_arrays(output.block_copies,
                                                                     self.cache.num_blocks))
        tables = {s.request.request_id: self.kv_cache_manager.block_ids(s.request.request_id)
                  for s in output.scheduled}
        in_flight_rows = ({r.request_id: row for row, r in enumerate(in_flight.batch
                                                                     .sampling_requests)}
                          if in_flight is not None else None)
        batch = build_step(output, tables, self.config.kv_cache.block_size, self.cache.num_slots,
                           self.model.config.vocab_size, self._eos_token_ids, self.chunks,
                           in_flight_rows)
        previous_tokens = in_flight.tokens if in_flight is not None else self._no_tokens
        tokens, logprobs, self.cache = paged_step(self.model.params, self.cache, batch.inputs,
                                                  batch.sampler, previous_tokens,
                                                  self.model.config, batch.flags, self.chunks)
        return _StepInFlight(output, batch, tokens, logprobs)

    def _finish(self, step: _StepInFlight) -> list[RequestOutput]:
        """Reads a dispatched step's tokens back (waiting for it) and advances its requests."""
        requests = step.batch.sampling_requests
        sampled = dict(zip((r.request_id for r in requests),
                           read_sampled(step.tokens, step.logprobs,
                                        [r.sampling.logprobs for r in requests]),
                           strict=True))
        self.scheduler.update(step.output, sampled, self._fork)
        group_ids = dict.fromkeys(r.group_id for r in requests)
        return [self._output(group_id) for group_id in group_ids if group_id in self._groups]

    @property
    def _eos_token_ids(self) -> tuple[int, ...]:
        return self.model.config.eos_token_ids

    def validate_request(self, request_id: str, prompt_token_ids, sampling: SamplingParams) -> None:
        """Raises ValueError / TypeError, naming the problem, for a request that cannot run."""
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(sampling).__name__}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was set)")
        if sampling.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"SamplingParams.n={sampling.n} exceeds max_num_seqs="
                             f"{self.config.scheduler.max_num_seqs}: the n completions run "
                             "together")
        validate_prompt(prompt_token_ids, self.model.config.vocab_size,
                        self.config.max_model_len, where=f"prompt of request {request_id!r}")
        pool = self.config.kv_cache
        if len(prompt_token_ids) >= pool.num_tokens:
            raise ValueError(
                f"prompt of request {request_id!r} has {len(prompt_token_ids)} tokens but the "
                f"KV cache pool holds {pool.num_tokens} (num_kv_blocks={pool.num_blocks} x "
                f"block_size={pool.block_size}), and it needs room for one generated token")

    def _sequence(self, prompt_token_ids, sampling: SamplingParams, arrival_time) -> Sequence:
        return Sequence(prompt_token_ids, sampling, self._eos_token_ids, self.max_request_len,
                        self.tokenizer, arrival_time)

    def _key_data(self, seed: int | None) -> np.ndarray:
        """A completion's key: from its seed, else the engine's key folded with a counter."""
        key = (jax.random.key(seed % 2**32) if seed is not None
               else jax.random.fold_in(self._key, next(self._key_counter)))
        return np.asarray(jax.random.key_data(key), np.uint32)

    def _fork(self, parent: Request) -> list[Request]:
        """Completions 1..n-1 of a request whose prompt is done. Child j of a seeded request
        gets a seed spawned from (seed, j), so completion 0 equals the request with n=1."""
        group = self._groups[parent.group_id]
        children = []
        for index in range(1, parent.sampling.n):
            seed = parent.sampling.seed
            if seed is not None:
                seed = int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])
            sampling = dataclasses.replace(parent.sampling, n=1, seed=seed)
            children.append(Request(
                str(next(self._internal_ids)), parent.prompt_token_ids, sampling,
                self._key_data(seed), self._sequence(parent.prompt_token_ids, sampling,
                                                     parent.arrival_time),
                parent.arrival_time, group_id=parent.group_id, completion_index=index))
        group.completions += children
        return children

    def _output(self, group_id: str) -> RequestOutput:
        group = self._groups[group_id]
        first = group.completions[0]
        finished = (first.num_children_to_fork == 0
                    and all(r.finished for r in group.completions))
        if finished:
            del self._groups[group_id]
        completions = [CompletionOutput(
            index=r.completion_index, text=r.sequence.text, token_ids=list(r.output_token_ids),
            finish_reason=r.sequence.finish_reason, stop_reason=r.sequence.stop_reason,
            logprobs=r.sequence.logprobs) for r in group.completions]
        return RequestOutput(request_id=group_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=completions,
                             finished=finished, metrics=_metrics(first),
                             num_cached_tokens=first.num_cached_tokens or 0)


def _metrics(request: Request) -> RequestMetrics:
    metrics = request.sequence.metrics()
    scheduled = request.first_scheduled_time
    metrics.queue_time = (scheduled - request.arrival_time) if scheduled is not None else 0.0
    return metrics


def _copy_block_arrays(copies, num_blocks: int):
    """(source, destination) block ids, padded to a power of two with dropped destinations."""
    num = 1 << (len(copies) - 1).bit_length()
    source = np.zeros(num, np.int32)
    destination = np.full(num, num_blocks, np.int32)
    source[:len(copies)], destination[:len(copies)] = zip(*copies, strict=True)
    return source, destination
