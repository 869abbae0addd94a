"""LLMEngine: vLLM's step API over the engine core — requests added, aborted and streamed
between steps, with n completions per request.

The engine knows nothing of batches the caller made: every step runs whichever requests the
scheduler picked, over one paged KV cache that lives on the device for the engine's lifetime.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

from folojax.config import EngineConfig
from folojax.engine.engine_core import EngineCore
from folojax.engine.kv_cache_manager import KVCacheManager
from folojax.engine.request import Request
from folojax.engine.validation import validate_request, validate_seed
from folojax.engine.warm_up import warm_up_steps
from folojax.ops.paged_kv_cache import init_paged_cache
from folojax.outputs import CompletionOutput, RequestOutput
from folojax.runner.model_runner import ModelRunner
from folojax.runner.sampling_inputs import seed_key_data, spawned_key_data
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


class LLMEngine:
    def __init__(self, model: Model, config: EngineConfig, seed: int = 0):
        validate_seed(seed, "LLMEngine")
        self.model = model
        self.config = config
        pool = config.kv_cache
        self.kv_cache_manager = KVCacheManager(pool.num_blocks, pool.block_size,
                                               pool.enable_prefix_caching)
        self.runner = ModelRunner(model.params, model.config,
                                  init_paged_cache(model.config, pool.num_blocks, pool.block_size,
                                                   model.dtype),
                                  config.scheduler.max_num_seqs,
                                  background_compile=config.background_compile,
                                  padded_steps_before_compile=config.padded_steps_before_compile,
                                  attention_backend=config.attention_backend)
        self.core = EngineCore(self.runner, self.kv_cache_manager, config.scheduler, self._fork)
        # A request never outgrows the pool: past its capacity it finishes with "length".
        self.max_request_len = min(config.max_model_len, pool.num_tokens)
        self._seed = seed
        self._key_counter = itertools.count()
        self._internal_ids = itertools.count()  # completions' ids: never a caller's id
        self._groups: dict[str, _Group] = {}
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", pool.num_blocks,
                    pool.block_size, pool.num_tokens)
        if pool.num_tokens < config.max_model_len:
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len=%d: longer "
                           "requests are cut at %d", pool.num_tokens, config.max_model_len,
                           pool.num_tokens)

    def warm_up(self, progress: bool = True) -> int:
        """Compiles the step's largest shapes now (engine/warm_up.py), so that no later step
        waits for a compile while one covers it; returns how many shapes it compiled."""
        steps = warm_up_steps(self.config, self.config.kv_cache.block_size,
                              self.max_request_len, self.runner.chunks)
        return self.runner.warm_up(steps, progress)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def cache(self):
        return self.runner.cache

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, prompt: str | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues a request; raises (and queues nothing) if it can never run."""
        request_id = str(request_id)
        self.validate_request(request_id, prompt_token_ids, sampling_params)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        first = Request(str(next(self._internal_ids)), prompt_token_ids, sampling_params,
                        self._key_data(sampling_params.seed),
                        eos_token_ids=self.model.config.eos_token_ids,
                        max_total_len=self.max_request_len, tokenizer=self.tokenizer,
                        arrival_time=time.perf_counter() if arrival_time is None
                        else arrival_time, group_id=request_id)
        self._groups[request_id] = _Group(request_id, prompt, prompt_token_ids, [first])
        self.core.add_request(first)

    def abort_request(self, request_id: str) -> None:
        """Stops the request (all its completions); their blocks return to the pool at once."""
        group = self._groups.pop(str(request_id), None)
        if group is not None:
            for request in group.completions:
                self.core.abort_request(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the (cumulative) output of every request that got a token,
        finished ones included with finished=True.

        With async scheduling (the default) a call returns the outputs of the previous call's
        step (the first returns none): see EngineCore.step."""
        advanced = self.core.step()
        group_ids = dict.fromkeys(r.group_id for r in advanced)
        return [self._output(group_id) for group_id in group_ids if group_id in self._groups]

    def validate_request(self, request_id: str, prompt_token_ids, sampling: SamplingParams) -> None:
        """Raises ValueError / TypeError, naming the problem, for a request that cannot run."""
        validate_request(prompt_token_ids, sampling, vocab_size=self.model.config.vocab_size,
                         room=self.config.max_model_len, has_tokenizer=self.tokenizer is not None,
                         max_logprobs=self.config.max_logprobs,
                         where=f"prompt of request {request_id!r}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if sampling.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"SamplingParams.n={sampling.n} exceeds max_num_seqs="
                             f"{self.config.scheduler.max_num_seqs}: the n completions run "
                             "together")
        pool = self.config.kv_cache
        if len(prompt_token_ids) >= pool.num_tokens:
            raise ValueError(
                f"prompt of request {request_id!r} has {len(prompt_token_ids)} tokens but the "
                f"KV cache pool holds {pool.num_tokens} (num_kv_blocks={pool.num_blocks} x "
                f"block_size={pool.block_size}), and it needs room for one generated token")

    def _key_data(self, seed: int | None):
        """A completion's key: from its seed, else spawned from the engine's seed and a counter
        (on the host: no device work per request)."""
        if seed is not None:
            return seed_key_data(seed)
        return spawned_key_data(self._seed, next(self._key_counter))

    def _fork(self, parent: Request) -> list[Request]:
        """Completions 1..n-1 of a request whose prompt is done. Child j of a seeded request
        gets a seed spawned from (seed, j), so completion 0 equals the request with n=1."""
        group = self._groups[parent.group_id]
        children = []
        for index in range(1, parent.sampling.n):
            seed = parent.sampling.seed
            if seed is not None:
                seed = int(spawned_key_data(seed, index).view("uint64")[0])
            sampling = dataclasses.replace(parent.sampling, n=1, seed=seed)
            children.append(parent.fork(str(next(self._internal_ids)), sampling,
                                        self._key_data(seed), index))
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
            index=r.completion_index, text=r.text, token_ids=r.output_token_ids,
            finish_reason=r.finish_reason, stop_reason=r.stop_reason, logprobs=r.logprobs,
            cumulative_logprob=r.cumulative_logprob) for r in group.completions]
        return RequestOutput(request_id=group_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=completions,
                             finished=finished, metrics=first.metrics(),
                             num_cached_tokens=first.num_cached_tokens or 0,
                             prompt_logprobs=first.prompt_logprobs)
