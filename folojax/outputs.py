"""What a finished request returns, with vLLM's names."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """Seconds, measured on the host from the request's arrival."""

    ttft: float  # time to first token
    tpot: float  # time per output token after the first
    e2e_latency: float
    num_output_tokens: int
    queue_time: float = 0.0  # from arrival until first scheduled

    @property
    def tokens_per_second(self) -> float:
        return self.num_output_tokens / self.e2e_latency if self.e2e_latency > 0 else 0.0


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per step: token id -> logprob
    cumulative_logprob: float | None = None  # sum of the chosen tokens' logprobs (if logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt token
    # {token id: logprob} of it and the top-N (None when not asked)
    prompt_logprobs: list[dict[int, float] | None] | None = None
