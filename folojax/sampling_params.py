"""SamplingParams: how to pick tokens and when to stop, with vLLM's field names and checks."""

from __future__ import annotations

import dataclasses
import math

SEED_LIMIT = 2**64  # seeds are 64-bit: [0, 2**64)


@dataclasses.dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p * (probability of the top token)
    seed: int | None = None  # per-request randomness, independent of the rest of the batch
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings are ignored before this many
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # also return the top-N logprobs of each step
    # also return, for each prompt token after the first, its logprob and the top-N (vLLM's)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self):
        def check(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(
                    f"SamplingParams.{field} must be {allowed}, got {getattr(self, field)!r}")

        check(_is_int(self.n) and self.n >= 1, "n", "an int >= 1")
        check(_is_number(self.temperature) and 0 <= self.temperature < math.inf, "temperature",
              "a finite number >= 0")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "-1, 0 (disabled) or >= 1")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT), "seed",
              "None or an int in [0, 2**64)")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", "None or an int >= 1")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed "
                             f"max_tokens ({self.max_tokens})")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "a non-empty string or a list of them")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "a list of token ids >= 0")
        for field in ("presence_penalty", "frequency_penalty"):
            check(_is_number(getattr(self, field)) and -2 <= getattr(self, field) <= 2, field,
                  "in [-2, 2]")
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
              "repetition_penalty", "> 0")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            check(value is None or (_is_int(value) and value >= 0), field, "None or an int >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
