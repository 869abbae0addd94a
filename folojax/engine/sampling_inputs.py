"""Builds the sampler's device inputs for a batch of rows from their SamplingParams (host side)."""

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops.sampling import SamplerFlags, SamplerState, SamplingTensors
from folojax.sampling_params import SamplingParams

PADDING_ROW = SamplingParams(temperature=0.0)


def sampler_flags(samplings: list[SamplingParams]) -> SamplerFlags:
    logprobs = [s.logprobs for s in samplings if s.logprobs is not None]
    return SamplerFlags(
        all_greedy=all(s.greedy for s in samplings),
        use_top_k_top_p=any(not s.greedy and (s.top_k > 0 or s.top_p < 1) for s in samplings),
        use_min_p=any(not s.greedy and s.min_p > 0 for s in samplings),
        use_penalties=any(s.uses_penalties for s in samplings),
        use_min_tokens=any(s.min_tokens > 0 for s in samplings),
        num_logprobs=max(logprobs) if logprobs else None,
    )


def row_keys(key: jax.Array, seeds: list[int | None]) -> jax.Array:
    """Row b's key: from its own seed if it has one, else `key` folded with b."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    batch = len(seeds)
    unseeded = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(batch))
    seed_values = np.array([0 if s is None else s % 2**32 for s in seeds], np.uint32)
    seeded = jax.vmap(jax.random.key)(jnp.asarray(seed_values))
    has_seed = jnp.asarray([s is not None for s in seeds])[:, None]
    data = jnp.where(has_seed, jax.random.key_data(seeded), jax.random.key_data(unseeded))
    return jax.random.wrap_key_data(data)


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


def build_sampler_inputs(samplings: list[SamplingParams], prompts: list[list[int]],
                         batch_size: int, vocab_size: int, key: jax.Array,
                         eos_token_ids: tuple[int, ...]):
    """(SamplingTensors, SamplerState, SamplerFlags) for `batch_size` rows; rows beyond
    len(samplings) are greedy padding. Vocab-sized state is allocated only if a row needs it."""
    rows = list(samplings) + [PADDING_ROW] * (batch_size - len(samplings))
    flags = sampler_flags(samplings)
    tensors = jax.device_put(sampling_tensors(rows, row_keys(key, [s.seed for s in rows])))
    penalty_width = vocab_size if flags.use_penalties else 1
    prompt_mask = np.zeros((batch_size, penalty_width), bool)
    if flags.use_penalties:
        for row, prompt in enumerate(prompts):
            prompt_mask[row, prompt] = True
    stop_width = vocab_size if flags.use_min_tokens else 1
    stop_mask = np.zeros((batch_size, stop_width), bool)
    if flags.use_min_tokens:
        for row, s in enumerate(samplings):
            stop_ids = stop_token_ids(s, eos_token_ids)
            stop_mask[row, [t for t in stop_ids if t < vocab_size]] = True
    state = SamplerState(
        num_generated=jnp.zeros((batch_size,), jnp.int32),
        output_counts=jnp.zeros((batch_size, penalty_width), jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask),
        stop_token_mask=jnp.asarray(stop_mask),
    )
    return tensors, state, flags
