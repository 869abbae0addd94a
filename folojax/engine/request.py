"""A request inside the engine (host side), in one place: its prompt, sampling parameters and
randomness, its tokens and how many of them the cache holds, its status, and its output (text,
logprobs, stop rules, timings)."""

from __future__ import annotations

import enum
import time

import numpy as np

from folojax.outputs import RequestMetrics
from folojax.sampling_params import SamplingParams
from folojax.tokenizer import IncrementalDetokenizer


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

    Its tokens are `all_token_ids`: `num_prefix_tokens` tokens the cache already held before it
    (folojax.generate continuing a cache row; their ids are not known and read as 0), the prompt,
    then the outputs read back so far; then `num_output_placeholders` tokens that steps still in
    flight have sampled. The cache holds (or a scheduled step will write) the first
    `num_computed_tokens`. The scheduler gives each request the tokens it still needs, and a
    request samples its next token in a step that computes all of them.

    Stop rules, in vLLM's order: EOS (unless ignore_eos) and stop_token_ids, then stop strings
    (the text is cut before the stop string), then max_tokens and `max_total_len` (the positions
    it may fill). Nothing stops a request before min_tokens outputs.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 key_data: np.ndarray, *, eos_token_ids: tuple[int, ...] = (),
                 max_total_len: int, tokenizer=None, arrival_time: float | None = None,
                 group_id: str | None = None, completion_index: int = 0,
                 num_prefix_tokens: int = 0):
        self.request_id = request_id
        self.group_id = request_id if group_id is None else group_id  # the user's request id
        self.completion_index = completion_index  # which of the group's n completions
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.key_data = key_data  # uint32 [2]: this completion's PRNG key
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_total_len = max_total_len
        self.tokenizer = tokenizer
        self.num_prefix_tokens = num_prefix_tokens
        self.all_token_ids = [0] * num_prefix_tokens + list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0  # sampled by steps in flight, not read back yet
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks, filled lazily
        self.num_children_to_fork = sampling.n - 1
        # The output.
        self.logprobs: list[dict[int, float]] | None = [] if sampling.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if sampling.logprobs is not None else None
        # Per prompt token: None for the first, then {its id: logprob, and the top-N}; filled
        # as the prompt's chunks are computed.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] * len(prompt_token_ids) if sampling.prompt_logprobs is not None else None)
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = (IncrementalDetokenizer(tokenizer, sampling.skip_special_tokens)
                            if tokenizer is not None else None)
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def fork(self, request_id: str, sampling: SamplingParams, key_data: np.ndarray,
             completion_index: int) -> Request:
        """A sibling completion of the same prompt (prompt computed: it waits for no tokens)."""
        return Request(request_id, self.prompt_token_ids, sampling, key_data,
                       eos_token_ids=tuple(self.eos_token_ids), max_total_len=self.max_total_len,
                       tokenizer=self.tokenizer, arrival_time=self.arrival_time,
                       group_id=self.group_id, completion_index=completion_index)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_output_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prefix_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prefix_tokens + self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finishes_in_flight(self) -> bool:
        """Whether the tokens in flight bring it to max_tokens or its room: there is nothing more
        to schedule for it."""
        return self.num_output_placeholders > 0 and self.reaches_length(
            self.num_output_tokens + self.num_output_placeholders)

    @property
    def num_outputs_left(self) -> int | float:
        """Outputs it may still produce after those read back and in flight, by max_tokens and
        its room (inf with neither)."""
        num_outputs = self.num_output_tokens + self.num_output_placeholders
        max_tokens = self.sampling.max_tokens
        by_room = self.max_total_len - self.num_prefix_tokens - self.num_prompt_tokens
        return min(by_room, float("inf") if max_tokens is None else max_tokens) - num_outputs

    def reaches_length(self, num_outputs: int) -> bool:
        """Whether `num_outputs` outputs reach max_tokens or fill the positions it may fill."""
        max_tokens = self.sampling.max_tokens
        return ((max_tokens is not None and num_outputs >= max_tokens)
                or self.num_prefix_tokens + self.num_prompt_tokens + num_outputs
                >= self.max_total_len)

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """Appends a sampled token and applies the stop rules."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.all_token_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id]
        sampling = self.sampling
        may_stop = self.num_output_tokens >= sampling.min_tokens
        if may_stop and not sampling.ignore_eos and token_id in self.eos_token_ids:
            self._finish("stop", None, token_id)
        elif may_stop and token_id in sampling.stop_token_ids:
            self._finish("stop", token_id, token_id)
        else:
            self._add_text(token_id, may_stop)
        if self.finish_reason is None and self.reaches_length(self.num_output_tokens):
            self._finish("length")
        if self.finish_reason is not None:
            self.finish_time = now
            self.status = (RequestStatus.FINISHED_STOPPED if self.finish_reason == "stop"
                           else RequestStatus.FINISHED_LENGTH)

    def _add_text(self, token_id: int, may_stop: bool) -> None:
        if self.detokenizer is None:
            return
        delta = self.detokenizer.add(token_id)
        if not delta:
            return
        # A stop string may start in text already emitted and end in this delta.
        searched_from = max(0, len(self.text) - max((len(s) for s in self.sampling.stop),
                                                    default=0) + 1)
        self.text += delta
        if may_stop and self.sampling.stop:
            self._check_stop_strings(searched_from)

    def _check_stop_strings(self, searched_from: int) -> None:
        hits = [(self.text.find(s, searched_from), s) for s in self.sampling.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if hits:
            index, stop = min(hits)
            keep = index + len(stop) if self.sampling.include_stop_str_in_output else index
            self.text = self.text[:keep]
            self.finish_reason, self.stop_reason = "stop", stop

    def _finish(self, reason: str, stop_reason=None, stop_token: int | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if self.detokenizer is None:
            return
        if stop_token is not None and self.sampling.include_stop_str_in_output:
            self.text += self.detokenizer.add(stop_token)
        self.text += self.detokenizer.flush()

    def metrics(self) -> RequestMetrics:
        end = self.finish_time or time.perf_counter()
        first = self.first_token_time or end
        num = self.num_output_tokens
        scheduled = self.first_scheduled_time
        return RequestMetrics(ttft=first - self.arrival_time,
                              tpot=(end - first) / (num - 1) if num > 1 else 0.0,
                              e2e_latency=end - self.arrival_time, num_output_tokens=num,
                              queue_time=(scheduled - self.arrival_time) if scheduled is not None
                              else 0.0)


def read_sampled(tokens, logprobs, num_logprobs: list[int | None], num_steps: int = 1
                 ) -> list[list[tuple[int, dict | None]]]:
    """Reads one step's sampled tokens back from the device: per row, per token it sampled (the
    first num_steps of a multi-step step's [steps, rows] tokens), (token id, {token id: logprob}
    of its top num_logprobs[row] and of the token itself, or None if not asked)."""
    tokens = np.asarray(tokens)
    if logprobs is not None:
        chosen, top_ids, top_values = (np.asarray(a) for a in logprobs)
    if tokens.ndim == 1:  # a step of one token per row
        tokens = tokens[None]
        if logprobs is not None:
            chosen, top_ids, top_values = chosen[None], top_ids[None], top_values[None]
    rows = []
    for row, n in enumerate(num_logprobs):
        row_tokens = []
        for step in range(num_steps):
            token = int(tokens[step, row])
            step_logprobs = None if n is None else _logprobs_dict(
                token, chosen[step, row], top_ids[step, row, :n], top_values[step, row, :n])
            row_tokens.append((token, step_logprobs))
        rows.append(row_tokens)
    return rows


def read_prompt_logprobs(entries: list[tuple[Request, int]], prompt_logprobs) -> None:
    """Stores one step's prompt logprobs (entries[j] = (request, index of the prompt token that
    entry j scores), in the step's order) into each request's prompt_logprobs."""
    chosen, top_ids, top_values = (np.asarray(a) for a in prompt_logprobs)
    for j, (request, index) in enumerate(entries):
        n = request.sampling.prompt_logprobs
        request.prompt_logprobs[index] = _logprobs_dict(
            request.prompt_token_ids[index], chosen[j], top_ids[j, :n], top_values[j, :n])


def _logprobs_dict(token_id: int, logprob, top_ids, top_logprobs) -> dict[int, float]:
    """{token id: logprob} of the top ones and of the token itself."""
    logprobs = dict(zip(top_ids.tolist(), top_logprobs.tolist(), strict=True))
    logprobs[token_id] = float(logprob)
    return logprobs
