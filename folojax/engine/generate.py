"""The functional API: prefill, decode_step and generate over an explicit cache from
init_cache, on the engine's own step.

Each prompt occupies one row of the cache, and continues after whatever the row already holds.
prefill and decode_step run one step and return logits; generate runs the engine core (its
scheduler, runner and async step loop) over the rows, with the cache's rows as the block tables.
All three donate the cache and return the new one.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import ModelConfig, SchedulerConfig
from folojax.engine.engine_core import EngineCore
from folojax.engine.request import Request
from folojax.engine.row_kv_cache_manager import RowKVCacheManager
from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput
from folojax.engine.validation import validate_request
from folojax.ops.paged_kv_cache import PagedKVCache
from folojax.outputs import RequestMetrics
from folojax.runner.model_runner import ModelRunner
from folojax.runner.sampling_inputs import row_key_data
from folojax.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
_NO_KEY = np.zeros(2, np.uint32)


@dataclasses.dataclass
class GenerateResult:
    """Per row (prompt): generated ids, why each stopped, and the cache, which holds each row's
    prompt and all its generated tokens but the last."""

    token_ids: list[list[int]]
    finish_reasons: list[str]
    stop_reasons: list[int | str | None]
    texts: list[str] | None  # when a tokenizer was given
    logprobs: list[list[dict[int, float]] | None]  # per row: per step {token id: logprob}
    metrics: list[RequestMetrics]
    cache: PagedKVCache
    # per row, with SamplingParams.prompt_logprobs: None for the first prompt token, then per
    # prompt token {token id: logprob} of it and the top-N (as RequestOutput.prompt_logprobs)
    prompt_logprobs: list[list[dict[int, float] | None] | None] | None = None


def _check_rows_cache(cache) -> None:
    if not isinstance(cache, PagedKVCache) or cache.block_tables is None:
        raise TypeError("cache must come from folojax.init_cache (a cache with rows), got "
                        f"{type(cache).__name__}")


def _row_step(params, cache: PagedKVCache, rows: dict[int, list[int]], config: ModelConfig,
              attention_backend: str):
    """Appends rows[b] to row b (rows left out get nothing); returns (logits [batch, vocab] of
    each row's last new token, zeros for rows left out, new cache)."""
    _check_rows_cache(cache)
    if not rows:  # nothing to compute
        return jnp.zeros((cache.batch_size, config.vocab_size), jnp.float32), cache
    lengths = np.array(cache.lengths)
    tables = np.asarray(cache.block_tables)
    scheduled, block_tables = [], {}
    for row, ids in rows.items():
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"row {row} has token ids outside [0, {config.vocab_size}): "
                             f"{bad[:5]}")
        if lengths[row] + len(ids) > cache.max_seq_len:
            raise ValueError(f"row {row} holds {lengths[row]} tokens: {len(ids)} more exceed "
                             f"the cache's max_seq_len={cache.max_seq_len}")
        request = Request(str(row), ids, _GREEDY, _NO_KEY, max_total_len=cache.max_seq_len,
                          num_prefix_tokens=int(lengths[row]))
        scheduled.append(ScheduledRequest(request, len(ids), int(lengths[row]), samples=True))
        block_tables[str(row)] = tables[row].tolist()
    runner = ModelRunner(params, config, cache, max_num_seqs=cache.batch_size,
                         attention_backend=attention_backend)
    logits = runner.logits(SchedulerOutput(scheduled, [], []), block_tables)
    order = np.asarray(list(rows), np.int32)
    logits = jnp.zeros((cache.batch_size, logits.shape[-1]), logits.dtype).at[order].set(
        logits[:len(order)])
    lengths[order] += [len(ids) for ids in rows.values()]
    return logits, dataclasses.replace(runner.cache, lengths=jnp.asarray(lengths))


def prefill(params, cache: PagedKVCache, token_ids, num_tokens, config: ModelConfig,
            attention_backend: str = "auto"):
    """Writes prompts [batch, seq] (row b: its first num_tokens[b] ids) after each row's cached
    tokens; returns (last-token logits [batch, vocab] float32, new cache). Donates `cache`.
    attention_backend: as generate's."""
    token_ids = np.asarray(token_ids)
    token_ids = token_ids[None] if token_ids.ndim == 1 else token_ids
    num_tokens = np.asarray(num_tokens).reshape(-1)
    rows = {row: token_ids[row, :n].tolist() for row, n in enumerate(num_tokens.tolist()) if n}
    return _row_step(params, cache, rows, config, attention_backend)


def decode_step(params, cache: PagedKVCache, token_ids, config: ModelConfig, active=None,
                attention_backend: str = "auto"):
    """Appends one token per row (rows where `active` is False are left as they are); returns
    (logits [batch, vocab] float32, new cache). Donates `cache`. attention_backend: as
    generate's."""
    token_ids = np.asarray(token_ids).reshape(-1)
    active = np.ones(len(token_ids), bool) if active is None else np.asarray(active, bool)
    rows = {row: [int(token_ids[row])] for row in np.flatnonzero(active).tolist()}
    return _row_step(params, cache, rows, config, attention_backend)


def _as_prompt_batch(prompt_token_ids) -> list[list[int]]:
    if isinstance(prompt_token_ids, (jax.Array, np.ndarray)):
        prompt_token_ids = np.asarray(prompt_token_ids).tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise TypeError("prompt_token_ids must be a list of ints or a list of lists of ints")
    if prompt_token_ids and all(isinstance(t, (int, np.integer)) for t in prompt_token_ids):
        return [list(prompt_token_ids)]
    return [list(p) if isinstance(p, (list, tuple)) else p for p in prompt_token_ids]


def generate(params, cache: PagedKVCache, key: jax.Array, prompt_token_ids, *,
             config: ModelConfig, sampling: SamplingParams | list[SamplingParams] | None = None,
             tokenizer=None, eos_token_ids: tuple[int, ...] | None = None,
             attention_backend: str = "auto") -> GenerateResult:
    """Generates a completion for each prompt (one prompt per cache row), continuing after
    whatever the cache rows already hold. Donates `cache`; the result carries the new one.

    Args:
      key: randomness for rows whose SamplingParams has no seed (row b uses key folded with b).
      prompt_token_ids: a list of ids, or a list of such lists (at most cache.batch_size).
      sampling: one SamplingParams for all rows, or one per row. Default: greedy, 16 tokens.
      tokenizer: needed for text output and stop strings.
      attention_backend: a name of folojax.list_attention_backends(), or "auto" (the fastest
        that serves the cache on this platform; logged). One that cannot serve the model's
        head_dim or the cache's block size or dtype raises a ValueError naming the limit.
    """
    _check_rows_cache(cache)
    prompts = _as_prompt_batch(prompt_token_ids)
    samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams(
        temperature=0.0)] * len(prompts)
    eos_token_ids = config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
    start_lengths = np.array(cache.lengths)  # tokens each row already holds
    _check_request(prompts, samplings, cache, start_lengths, config, tokenizer)
    keys = row_key_data(key, [s.seed for s in samplings])
    start = time.perf_counter()
    requests = [Request(str(row), [int(t) for t in prompt], s, keys[row],
                        eos_token_ids=eos_token_ids, max_total_len=cache.max_seq_len,
                        tokenizer=tokenizer, arrival_time=start,
                        num_prefix_tokens=int(start_lengths[row]))
                for row, (prompt, s) in enumerate(zip(prompts, samplings, strict=True))]
    rows = RowKVCacheManager(np.asarray(cache.block_tables), cache.block_size)
    runner = ModelRunner(params, config, cache, max_num_seqs=len(prompts),
                         eos_token_ids=eos_token_ids, attention_backend=attention_backend)
    core = EngineCore(runner, rows, SchedulerConfig(max_num_seqs=len(prompts)))
    for row, request in enumerate(requests):
        rows.assign(request, row)
        core.add_request(request)
    while core.has_unfinished_requests():
        core.step()

    # A step after a row's last may have fed its last token; either way the cache is defined to
    # hold each row's prompt and every generated token but the last (which was never fed back).
    final_lengths = start_lengths.copy()
    for row, request in enumerate(requests):
        final_lengths[row] += request.num_prompt_tokens + request.num_output_tokens - 1
    cache = dataclasses.replace(runner.cache, lengths=jnp.asarray(final_lengths, jnp.int32))
    return GenerateResult(
        token_ids=[r.output_token_ids for r in requests],
        finish_reasons=[r.finish_reason for r in requests],
        stop_reasons=[r.stop_reason for r in requests],
        texts=[r.text for r in requests] if tokenizer is not None else None,
        logprobs=[r.logprobs for r in requests],
        metrics=[r.metrics() for r in requests],
        cache=cache,
        prompt_logprobs=[r.prompt_logprobs for r in requests],
    )


def _check_request(prompts, samplings, cache, start_lengths, config, tokenizer) -> None:
    if len(samplings) != len(prompts):
        raise ValueError(f"got {len(samplings)} SamplingParams for {len(prompts)} prompts")
    if len(prompts) > cache.batch_size:
        raise ValueError(f"{len(prompts)} prompts but the cache has batch_size="
                         f"{cache.batch_size}; one row per prompt")
    for row, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        validate_request(prompt, sampling, vocab_size=config.vocab_size,
                         room=cache.max_seq_len - int(start_lengths[row]),
                         has_tokenizer=tokenizer is not None, where=f"prompt {row}")
        if sampling.n != 1:
            raise ValueError("folojax.generate makes one completion per row (SamplingParams.n=1);"
                             " repeat the prompt, or use LLM for n > 1")
