"""folojax.generate: the functional generation loop over one explicit KV cache.

Each prompt occupies one row of the cache. The loop prefills all rows in one step, then decodes
one token per unfinished row per step. The next step is dispatched (JAX runs it asynchronously)
before the host reads the previous step's tokens, so stop checks overlap device work.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import ModelConfig
from folojax.engine.buckets import bucket
from folojax.engine.sampling_inputs import build_sampler_inputs
from folojax.engine.sequence import Sequence, read_sampled
from folojax.model.step import step_and_sample
from folojax.ops.kv_cache import KVCache
from folojax.outputs import RequestMetrics
from folojax.sampling_params import SamplingParams

MIN_SEQ_BUCKET = 16  # prompt lengths are padded to 16, 32, 64, ...
MIN_KV_BUCKET = 256  # attended cache lengths to 256, 512, ...: few decode compiles per generation


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
    cache: KVCache


def _as_prompt_batch(prompt_token_ids) -> list[list[int]]:
    if isinstance(prompt_token_ids, (jax.Array, np.ndarray)):
        prompt_token_ids = np.asarray(prompt_token_ids).tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise TypeError("prompt_token_ids must be a list of ints or a list of lists of ints")
    if prompt_token_ids and all(isinstance(t, (int, np.integer)) for t in prompt_token_ids):
        return [list(prompt_token_ids)]
    return [list(p) for p in prompt_token_ids]


def validate_prompt(prompt: list[int], vocab_size: int, room: int, where: str = "prompt") -> None:
    """Raises ValueError for an empty prompt, ids outside the vocab, or no room to generate."""
    if not prompt:
        raise ValueError(f"{where} is empty: at least one token is needed")
    bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has invalid token ids (ids are ints in [0, {vocab_size})): "
                         f"{bad[:5]}")
    if len(prompt) >= room:
        raise ValueError(
            f"{where} has {len(prompt)} tokens but max_model_len leaves room for {room} in total "
            f"(prompt plus at least one generated token)"
        )


def generate(params, cache: KVCache, key: jax.Array, prompt_token_ids, *, config: ModelConfig,
             sampling: SamplingParams | list[SamplingParams] | None = None, tokenizer=None,
             eos_token_ids: tuple[int, ...] | None = None) -> GenerateResult:
    """Generates a completion for each prompt (one prompt per cache row), continuing after
    whatever the cache rows already hold. Donates `cache`; the result carries the new one.

    Args:
      key: randomness for rows whose SamplingParams has no seed (row b uses key folded with b).
      prompt_token_ids: a list of ids, or a list of such lists (at most cache.batch_size).
      sampling: one SamplingParams for all rows, or one per row. Default: greedy, 16 tokens.
      tokenizer: needed for text output and stop strings.
    """
    prompts = _as_prompt_batch(prompt_token_ids)
    samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams(
        temperature=0.0)] * len(prompts)
    eos_token_ids = config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
    start_lengths = np.asarray(cache.lengths)  # tokens each row already holds
    _check_request(prompts, samplings, cache, start_lengths, config, tokenizer)
    max_seq_len = cache.max_seq_len
    start = time.perf_counter()
    sequences = [
        Sequence(p, s, eos_token_ids, max_seq_len - int(start_lengths[row]), tokenizer, start)
        for row, (p, s) in enumerate(zip(prompts, samplings, strict=True))
    ]
    batch = cache.batch_size
    tensors, sampler_state, flags = build_sampler_inputs(
        samplings, prompts, batch, config.vocab_size, key, eos_token_ids)

    lengths = start_lengths.copy()  # host mirror of cache.lengths
    num_tokens = np.zeros(batch, np.int32)
    num_tokens[:len(prompts)] = [len(p) for p in prompts]
    token_ids = np.zeros((batch, bucket(num_tokens.max(), MIN_SEQ_BUCKET, max_seq_len)), np.int32)
    for row, prompt in enumerate(prompts):
        token_ids[row, :len(prompt)] = prompt

    def dispatch(token_ids, num_tokens):
        nonlocal cache, sampler_state
        kv_len = bucket(int((lengths + num_tokens).max()), MIN_KV_BUCKET, max_seq_len)
        tokens, logprobs, cache, sampler_state = step_and_sample(
            params, cache, token_ids, jnp.asarray(num_tokens), tensors, sampler_state,
            config, kv_len, flags)
        lengths[:] += num_tokens
        return tokens, logprobs

    pending = dispatch(jnp.asarray(token_ids), num_tokens)
    while True:
        running = [row for row, s in enumerate(sequences) if not s.finished]
        upcoming = None
        num_tokens = np.zeros(batch, np.int32)
        num_tokens[running] = 1
        num_tokens[lengths >= max_seq_len] = 0
        if num_tokens.any():  # speculatively feed the tokens not yet read back
            upcoming = dispatch(pending[0][:, None], num_tokens)
        _record(sequences, running, pending)
        if upcoming is None or all(s.finished for s in sequences):
            break
        pending = upcoming

    # A speculative step may have fed some rows' last token; either way the cache is defined to
    # hold each row's prompt and every generated token but the last (which was never fed back).
    final_lengths = start_lengths.copy()
    for row, s in enumerate(sequences):
        final_lengths[row] += len(s.prompt_token_ids) + len(s.token_ids) - 1
    cache = dataclasses.replace(cache, lengths=jnp.asarray(final_lengths, jnp.int32))
    return GenerateResult(
        token_ids=[s.token_ids for s in sequences],
        finish_reasons=[s.finish_reason for s in sequences],
        stop_reasons=[s.stop_reason for s in sequences],
        texts=[s.text for s in sequences] if tokenizer is not None else None,
        logprobs=[s.logprobs for s in sequences],
        metrics=[s.metrics() for s in sequences],
        cache=cache,
    )


def _record(sequences: list[Sequence], rows: list[int], step_output) -> None:
    """Reads one step's tokens (and logprobs) back to the host and appends them."""
    tokens, logprobs = step_output
    num_logprobs = [sequence.sampling.logprobs for sequence in sequences]
    sampled = read_sampled(tokens, logprobs, num_logprobs)
    for row in rows:
        sequences[row].append(*sampled[row])


def _check_request(prompts, samplings, cache, start_lengths, config, tokenizer) -> None:
    if len(samplings) != len(prompts):
        raise ValueError(f"got {len(samplings)} SamplingParams for {len(prompts)} prompts")
    if len(prompts) > cache.batch_size:
        raise ValueError(f"{len(prompts)} prompts but the cache has batch_size="
                         f"{cache.batch_size}; one row per prompt")
    for row, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if sampling.n != 1:
            raise ValueError("folojax.generate makes one completion per row (SamplingParams.n=1);"
                             " repeat the prompt, or use LLM for n > 1")
        if sampling.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer=...")
        validate_prompt(prompt, config.vocab_size, cache.max_seq_len - int(start_lengths[row]),
                        where=f"prompt {row}")
