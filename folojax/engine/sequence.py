"""One sequence being generated, on the host: its tokens, text, and the rules that finish it."""

import time

import numpy as np

from folojax.outputs import RequestMetrics
from folojax.sampling_params import SamplingParams
from folojax.tokenizer import IncrementalDetokenizer


class Sequence:
    """Appends sampled tokens and decides, after each, whether the sequence is finished.

    Stop rules, in vLLM's order: EOS (unless ignore_eos) and stop_token_ids, then stop strings
    (the text is cut before the stop string), then max_tokens and the room left in the cache.
    Nothing stops a sequence before min_tokens outputs.
    """

    def __init__(self, prompt_token_ids: list[int], sampling: SamplingParams,
                 eos_token_ids: tuple[int, ...], max_total_len: int, tokenizer=None,
                 start_time: float | None = None):
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_total_len = max_total_len  # cache positions this sequence may fill
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if sampling.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = (IncrementalDetokenizer(tokenizer, sampling.skip_special_tokens)
                            if tokenizer is not None else None)
        self.start_time = time.perf_counter() if start_time is None else start_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        sampling = self.sampling
        may_stop = len(self.token_ids) >= sampling.min_tokens
        if may_stop and not sampling.ignore_eos and token_id in self.eos_token_ids:
            self._finish("stop", None, token_id)
        elif may_stop and token_id in sampling.stop_token_ids:
            self._finish("stop", token_id, token_id)
        else:
            self._add_text(token_id, may_stop)
        if not self.finished and self.reaches_length(len(self.token_ids)):
            self._finish("length")
        if self.finished:
            self.finish_time = now

    def reaches_length(self, num_outputs: int) -> bool:
        """Whether `num_outputs` outputs reach max_tokens or fill the room left in the cache."""
        max_tokens = self.sampling.max_tokens
        return ((max_tokens is not None and num_outputs >= max_tokens)
                or len(self.prompt_token_ids) + num_outputs >= self.max_total_len)

    def _add_text(self, token_id: int, may_stop: bool) -> None:
        if self.detokenizer is None:
            return
        delta = self.detokenizer.add(token_id)
        if not delta:
            return
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
        num = len(self.token_ids)
        return RequestMetrics(ttft=first - self.start_time,
                              tpot=(end - first) / (num - 1) if num > 1 else 0.0,
                              e2e_latency=end - self.start_time, num_output_tokens=num)


def read_sampled(tokens, logprobs, num_logprobs: list[int | None]) -> list[tuple[int, dict | None]]:
    """Reads one step's sampled tokens back from the device: per row, (token id, {token id:
    logprob} of its top num_logprobs[row] and of the token itself, or None if not asked)."""
    tokens = np.asarray(tokens)
    if logprobs is not None:
        chosen, top_ids, top_values = (np.asarray(a) for a in logprobs)
    rows = []
    for row, n in enumerate(num_logprobs):
        step_logprobs = None
        if n is not None:
            step_logprobs = dict(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist(),
                                     strict=True))
            step_logprobs[int(tokens[row])] = float(chosen[row])
        rows.append((int(tokens[row]), step_logprobs))
    return rows
