"""The device step: the decoder over a flat batch of decode rows and prefill chunks, reading and
writing the paged cache, then either sampling (paged_step, for generation) or returning logits
(paged_logits, for folojax.prefill and decode_step); paged_decode_steps runs several decode steps
in a device loop, each feeding its sampled tokens to the next. Each is jitted once per shape
bucket and donates the cache; the logits never leave the device in paged_step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from folojax.config import ModelConfig
from folojax.model.decoder import count_compile, decoder_layers, lm_head
from folojax.ops.attention_backends import step_attention
from folojax.ops.paged_attention import AttentionRows, ChunkSizes
from folojax.ops.paged_kv_cache import PagedKVCache, write_slots
from folojax.ops.sampling import SamplerFlags, SamplerState, sample, token_logprobs
from folojax.ops.step_inputs import DecodeStepsInputs, SamplerInputs, StepInputs


def paged_hidden(params, config: ModelConfig, cache: PagedKVCache, inputs: StepInputs,
                 chunks: ChunkSizes):
    """Final hidden states [sampling rows + prompt-logprob entries, hidden] of the tokens that
    get logits (inputs.sample_indices, then inputs.prompt_logprob_indices), and the cache with
    every token's keys and values written."""
    num_rows = inputs.num_decode_rows

    def attend(layer_index, q, k, v, cache):
        q, k, v = q[0], k[0], v[0]  # one flat "batch" of tokens
        cache = write_slots(cache, layer_index, k, v, inputs.slot_mapping)
        k_cache, v_cache = cache.k[layer_index], cache.v[layer_index]
        decode_rows = AttentionRows(q[:num_rows, None], inputs.decode_items,
                                    inputs.positions[:num_rows, None], chunks.decode_items)
        if inputs.tile_token_indices.shape[0] == 0:  # static: a decode-only step
            [decode] = step_attention(chunks.backend, k_cache, v_cache, (decode_rows,))
            return decode[:, 0][None], cache
        # Prefill tiles gather their queries from the flat prefill tokens, and scatter back.
        prefill_q = jnp.take(q[num_rows:], inputs.tile_token_indices, axis=0, mode="fill",
                             fill_value=0)  # [tiles, PREFILL_TILE, heads, head_dim]
        tile_rows = AttentionRows(prefill_q, inputs.prefill_items, inputs.tile_positions,
                                  chunks.prefill_items)
        decode, tiles = step_attention(chunks.backend, k_cache, v_cache,
                                       (decode_rows, tile_rows))
        decode = decode[:, 0]
        prefill = tiles.reshape(-1, *q.shape[1:])[inputs.token_tile_indices]
        out = jnp.concatenate([decode, prefill])
        return out[None], cache

    keep = jnp.concatenate([inputs.sample_indices, inputs.prompt_logprob_indices])
    hidden, cache = decoder_layers(params, config, inputs.token_ids[None],
                                   inputs.positions[None], attend, cache, keep=keep[None])
    return hidden[0], cache


def _sampler_state(sampler: SamplerInputs, previous_tokens, vocab_size: int,
                   flags: SamplerFlags) -> SamplerState:
    """Rebuilds the vocab-sized sampler state from token-id lists (only what the flags use); an
    output still in flight is read from previous_tokens."""
    rows = jnp.arange(sampler.num_generated.shape[0])[:, None]

    def mask(ids, width):
        return jnp.zeros((rows.shape[0], width), bool).at[rows, ids].set(True, mode="drop")

    width = vocab_size if flags.use_penalties else 1
    counts = jnp.zeros((rows.shape[0], width), jnp.int32)
    if flags.use_penalties:
        counts = counts.at[rows, sampler.output_token_ids].add(1, mode="drop")
        in_flight = jnp.where(sampler.output_sources >= 0,
                              previous_tokens[jnp.maximum(sampler.output_sources, 0)], vocab_size)
        counts = counts.at[rows[:, 0], in_flight].add(1, mode="drop")
    return SamplerState(
        num_generated=sampler.num_generated,
        output_counts=counts,
        prompt_mask=mask(sampler.prompt_token_ids, width),
        stop_token_mask=mask(sampler.banned_token_ids,
                             vocab_size if flags.use_min_tokens else 1),
    )


def _with_in_flight_tokens(inputs: StepInputs, previous_tokens) -> StepInputs:
    return dataclasses.replace(inputs, token_ids=jnp.where(
        inputs.token_sources >= 0, previous_tokens[jnp.maximum(inputs.token_sources, 0)],
        inputs.token_ids))


@functools.partial(jax.jit, static_argnames=("config", "flags", "chunks"),
                   donate_argnames=("cache",))
def paged_step(params, cache: PagedKVCache, inputs: StepInputs, sampler: SamplerInputs,
               previous_tokens, config: ModelConfig, flags: SamplerFlags, chunks: ChunkSizes):
    """Returns (tokens [max rows], logprobs or None, prompt logprobs or None, new cache).
    Donates `cache`. Prompt logprobs, when flags ask: (each entry's target logprob, top ids,
    top logprobs), as sample's logprobs are for the sampled tokens.

    previous_tokens [max rows]: the tokens of the step before, which may still be in flight (as
    this step returns its own: sampling rows first, padded to a fixed width, so the shape never
    recompiles); a token whose `inputs.token_sources` entry is a row of it is read from there.
    """
    count_compile("paged_step")
    hidden, cache = paged_hidden(params, config, cache,
                                 _with_in_flight_tokens(inputs, previous_tokens), chunks)
    logits = lm_head(params, hidden)
    num_rows = inputs.sample_indices.shape[0]
    prompt_logprobs = None
    if flags.num_prompt_logprobs is not None:
        prompt_logprobs = token_logprobs(jax.nn.log_softmax(logits[num_rows:], axis=-1),
                                         inputs.prompt_logprob_targets, flags.num_prompt_logprobs)
    tensors = dataclasses.replace(sampler.tensors,
                                  keys=jax.random.wrap_key_data(sampler.tensors.keys))
    state = _sampler_state(sampler, previous_tokens, config.vocab_size, flags)
    tokens, logprobs, _ = sample(logits[:num_rows], tensors, state, flags)
    tokens = jnp.zeros_like(previous_tokens).at[:tokens.shape[0]].set(tokens)
    return tokens, logprobs, prompt_logprobs, cache


@functools.partial(jax.jit, static_argnames=("config", "flags", "chunks"),
                   donate_argnames=("cache",))
def paged_decode_steps(params, cache: PagedKVCache, inputs: StepInputs, steps: DecodeStepsInputs,
                       sampler: SamplerInputs, previous_tokens, config: ModelConfig,
                       flags: SamplerFlags, chunks: ChunkSizes):
    """paged_step's decode rows, up to `steps.num_steps` times in a device loop: step i runs each
    row at its position + i on the token step i - 1 sampled. The loop stops early once every row
    has sampled one of its stop tokens (steps.stop_token_ids; padding rows count as stopped).
    Returns (tokens [max steps, rows], logprobs (each with a leading [max steps]) or None, new
    cache, the steps run); steps not run are zeros. Donates `cache`. A row samples as
    paged_step would at each output index, so its tokens are the same as those of single
    steps."""
    count_compile("paged_decode_steps")
    max_steps, num_rows = steps.slot_mapping.shape
    if inputs.tile_token_indices.shape[0] or inputs.sample_indices.shape[0] != num_rows:
        raise ValueError("paged_decode_steps runs decode rows alone, each sampling")
    inputs = _with_in_flight_tokens(inputs, previous_tokens)
    tensors = dataclasses.replace(sampler.tensors,
                                  keys=jax.random.wrap_key_data(sampler.tensors.keys))
    state = _sampler_state(sampler, previous_tokens, config.vocab_size, flags)

    def running(carry):
        i, stopped = carry[0], carry[-1]
        return (i < steps.num_steps) & ~jnp.all(stopped)

    def step(carry):
        i, cache, token_ids, state, tokens, logprobs, stopped = carry
        step_inputs = dataclasses.replace(
            inputs, token_ids=token_ids, slot_mapping=steps.slot_mapping[i],
            positions=jnp.where(inputs.positions >= 0, inputs.positions + i, -1))
        hidden, cache = paged_hidden(params, config, cache, step_inputs, chunks)
        sampled, step_logprobs, state = sample(lm_head(params, hidden), tensors, state, flags)
        tokens = tokens.at[i].set(sampled)
        if logprobs is not None:
            logprobs = tuple(a.at[i].set(b) for a, b in zip(logprobs, step_logprobs,
                                                            strict=True))
        stopped = stopped | jnp.any(sampled[:, None] == steps.stop_token_ids, axis=1)
        return i + 1, cache, sampled, state, tokens, logprobs, stopped

    logprobs = None
    if flags.num_logprobs is not None:
        n = flags.num_logprobs
        logprobs = (jnp.zeros((max_steps, num_rows), jnp.float32),
                    jnp.zeros((max_steps, num_rows, n), jnp.int32),
                    jnp.zeros((max_steps, num_rows, n), jnp.float32))
    tokens = jnp.zeros((max_steps, num_rows), jnp.int32)
    padding_rows = inputs.positions[:num_rows] < 0
    steps_run, cache, _, _, tokens, logprobs, _ = jax.lax.while_loop(
        running, step, (jnp.int32(0), cache, inputs.token_ids, state, tokens, logprobs,
                        padding_rows))
    return tokens, logprobs, cache, steps_run


@functools.partial(jax.jit, static_argnames=("config", "chunks"), donate_argnames=("cache",))
def paged_logits(params, cache: PagedKVCache, inputs: StepInputs, config: ModelConfig,
                 chunks: ChunkSizes):
    """Returns (logits [sampling rows, vocab] float32, new cache). Donates `cache`."""
    count_compile("paged_logits")
    hidden, cache = paged_hidden(params, config, cache, inputs, chunks)
    return lm_head(params, hidden[:inputs.sample_indices.shape[0]]), cache
