"""The jitted step of generation: run the decoder over new tokens, then sample from its logits.

Fusing the two keeps the [batch, vocab] logits on the device; only the sampled ids cross back.
"""

import functools

import jax

from folojax.model.decoder import cached_step, count_compile
from folojax.ops.sampling import SamplerFlags, SamplerState, SamplingTensors, sample


@functools.partial(jax.jit, static_argnames=("config", "kv_len", "flags"),
                   donate_argnames=("cache", "sampler_state"))
def step_and_sample(params, cache, token_ids, num_tokens, sampling: SamplingTensors,
                    sampler_state: SamplerState, config, kv_len: int, flags: SamplerFlags):
    """Returns (tokens [batch], logprobs or None, new cache, new sampler state)."""
    count_compile("step_and_sample")
    logits, cache = cached_step(params, cache, token_ids, num_tokens, config, kv_len)
    tokens, logprobs, sampler_state = sample(logits, sampling, sampler_state, flags)
    return tokens, logprobs, cache, sampler_state
