"""The sampler's inputs for one step, built on the host from each row's SamplingParams, and the
per-request PRNG keys (derived on the host: no device round trip per request)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from folojax.ops.sampling import SamplerFlags, SamplingTensors
from folojax.ops.step_inputs import SamplerInputs
from folojax.runner.buckets import bucket
from folojax.sampling_params import SamplingParams

if TYPE_CHECKING:
    from folojax.engine.request import Request

PADDING_ROW = SamplingParams(temperature=0.0)


def logprobs_bucket(n: int) -> int:
    """Top-N logprobs are computed for N rounded up to a power of two (sliced on the host), so a
    handful of N values compile, not one per N."""
    return bucket(max(n, 1), 1)


def sampler_flags(samplings: list[SamplingParams]) -> SamplerFlags:
    logprobs = [s.logprobs for s in samplings if s.logprobs is not None]
    return SamplerFlags(
        all_greedy=all(s.greedy for s in samplings),
        use_top_k_top_p=any(not s.greedy and (s.top_k > 0 or s.top_p < 1) for s in samplings),
        use_min_p=any(not s.greedy and s.min_p > 0 for s in samplings),
        use_penalties=any(s.uses_penalties for s in samplings),
        use_min_tokens=any(s.min_tokens > 0 for s in samplings),
        num_logprobs=logprobs_bucket(max(logprobs)) if logprobs else None,
    )


def seed_key_data(seed: int) -> np.ndarray:
    """The raw data (uint32 [2]) of jax.random.key(seed) for a seed in [0, 2**64), computed on
    the host: the high and the low 32 bits."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def spawned_key_data(entropy: int, index: int) -> np.ndarray:
    """Key data spawned from (entropy, index): an engine's index-th unseeded request (entropy:
    the engine's seed), or completion `index` of a seeded request (entropy: its seed)."""
    return np.random.SeedSequence(entropy, spawn_key=(index,)).generate_state(2, np.uint32)


def row_key_data(key: jax.Array, seeds: list[int | None]) -> np.ndarray:
    """Key data per row of folojax.generate: its own seed's, else `key` folded with the row."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    folded = np.asarray(jax.random.key_data(jax.vmap(lambda row: jax.random.fold_in(key, row))(
        np.arange(len(seeds)))), np.uint32)
    return np.stack([folded[row] if seed is None else seed_key_data(seed)
                     for row, seed in enumerate(seeds)]) if seeds else folded


def sampling_tensors(rows: list[SamplingParams], keys) -> SamplingTensors:
    """Per-row parameter columns (numpy on the host until the step moves them) and keys."""

    def column(name, dtype):
        return np.array([getattr(s, name) for s in rows], dtype)

    return SamplingTensors(
        temperature=column("temperature", np.float32), top_k=column("top_k", np.int32),
        top_p=column("top_p", np.float32), min_p=column("min_p", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        min_tokens=column("min_tokens", np.int32), keys=keys,
    )


def stop_token_ids(sampling: SamplingParams, eos_token_ids: tuple[int, ...]) -> list[int]:
    """The tokens min_tokens bans: stop_token_ids, and EOS unless ignore_eos."""
    return list(sampling.stop_token_ids) + ([] if sampling.ignore_eos else list(eos_token_ids))


def build_sampler(requests: list[Request], num_rows: int, vocab_size: int,
                  eos_token_ids: tuple[int, ...], in_flight_rows: dict[str, int] | None = None,
                  num_steps: int = 1) -> tuple[SamplerInputs, SamplerFlags]:
    """The sampler inputs of `requests` (one sampling row each, sampling num_steps tokens),
    padded to num_rows.

    A request's output sampled by the step in flight is not on the host yet: its row there
    (`in_flight_rows`) is passed instead, and the device counts it for the penalties."""
    samplings = [r.sampling for r in requests]
    flags = sampler_flags(samplings)
    rows = samplings + [PADDING_ROW] * (num_rows - len(requests))
    keys = np.zeros((num_rows, 2), np.uint32)
    if requests:
        keys[:len(requests)] = np.stack([r.key_data for r in requests])
    num_generated = np.zeros(num_rows, np.int32)
    # The (first) output index each row samples: outputs read back, plus those in flight before
    # this step's own placeholders.
    num_generated[:len(requests)] = [
        len(r.output_token_ids) + r.num_output_placeholders - num_steps for r in requests]
    output_sources = np.full(num_rows, -1, np.int32)
    for row, request in enumerate(requests):
        in_flight = request.num_output_placeholders - num_steps
        if in_flight > 1:
            raise RuntimeError(f"request {request.request_id} has {in_flight} outputs in flight; "
                               "at most one step runs ahead of the host")
        if in_flight == 1:
            output_sources[row] = in_flight_rows[request.request_id]

    def id_lists(lists: list[list[int]], used: bool) -> np.ndarray:
        width = bucket(max((len(x) for x in lists), default=1), 16) if used else 1
        array = np.full((num_rows, width), vocab_size, np.int32)
        if used:
            for row, ids in enumerate(lists):
                array[row, :len(ids)] = ids
        return array

    sampler = SamplerInputs(
        tensors=sampling_tensors(rows, keys),
        num_generated=num_generated,
        prompt_token_ids=id_lists([r.prompt_token_ids for r in requests], flags.use_penalties),
        output_token_ids=id_lists([r.output_token_ids for r in requests], flags.use_penalties),
        output_sources=output_sources,
        banned_token_ids=id_lists([stop_token_ids(r.sampling, eos_token_ids)
                                   for r in requests], flags.use_min_tokens),
    )
    return sampler, flags
