"""A request inside the engine (host side): its tokens, how many of them the cache holds, its
status, and its randomness. Stop rules and text live in its Sequence."""

from __future__ import annotations

import enum
import time

import numpy as np

from folojax.engine.sequence import Sequence
from folojax.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


class Request:
    """One completion being generated. A request with SamplingParams(n=k) forks k - 1 children
    once its prompt is computed; each child is a Request of its own with n=1.

    The cache holds (or a scheduled step will write) the first `num_computed_tokens` of its
    tokens: `all_token_ids` (prompt + outputs read back so far) followed by
    `num_output_placeholders` tokens that steps still in flight have sampled. The scheduler gives
    each request the tokens it still needs, and a request samples its next token in a step that
    computes all of them.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 key_data: np.ndarray, sequence: Sequence, arrival_time: float | None = None,
                 group_id: str | None = None, completion_index: int = 0):
        self.request_id = request_id
        self.group_id = request_id if group_id is None else group_id  # the user's request id
        self.completion_index = completion_index  # which of the group's n completions
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.key_data = key_data  # uint32 [2]: this completion's PRNG key
        self.sequence = sequence
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0  # sampled by steps in flight, not read back yet
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled lazily
        self.num_children_to_fork = sampling.n - 1

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_output_placeholders

    @property
    def finishes_in_flight(self) -> bool:
        """Whether the tokens in flight bring it to max_tokens or the cache's room: there is
        nothing more to schedule for it."""
        return self.num_output_placeholders > 0 and self.sequence.reaches_length(
            len(self.output_token_ids) + self.num_output_placeholders)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.sequence.token_ids

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.sequence.append(token_id, logprobs)
        self.all_token_ids.append(token_id)
        if self.sequence.finished:
            self.status = (RequestStatus.FINISHED_STOPPED if self.sequence.finish_reason == "stop"
                           else RequestStatus.FINISHED_LENGTH)
