"""One jitted sampler for a whole batch, with per-row parameters, so greedy and sampled rows mix.

Order of operations (as in Hugging Face): penalties on the raw logits, then temperature, top-k,
top-p, min-p, then a Gumbel-max draw. Row b's noise comes from its own key folded with its output
position, so a seeded row draws the same tokens whatever else is in the batch.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters, each [batch]; built on the host once per batch."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    min_p: jax.Array  # float32, 0 = off
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    min_tokens: jax.Array  # int32: stop tokens are banned before this many outputs
    keys: jax.Array  # [batch] typed PRNG keys, one per row


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """What the sampler needs to remember between steps; updated on device."""

    num_generated: jax.Array  # [batch] int32: also the position folded into each row's key
    output_counts: jax.Array  # [batch, vocab] int32: occurrences of each token in the output
    prompt_mask: jax.Array  # [batch, vocab] bool: token occurs in the prompt
    stop_token_mask: jax.Array  # [batch, vocab] bool: EOS and stop_token_ids (for min_tokens)


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static switches: features no row uses cost nothing (each combination compiles once)."""

    all_greedy: bool = True
    use_top_k_top_p: bool = False
    use_min_p: bool = False
    use_penalties: bool = False
    use_min_tokens: bool = False
    num_logprobs: int | None = None  # top-N logprobs to return; None = none
    # top-N logprobs of each prompt token's distribution (StepInputs.prompt_logprob_indices)
    num_prompt_logprobs: int | None = None


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis of [batch, vocab] (the first index of the maximum), in int32.

    Done as the maximum of each slice of the vocab (128 wide, or the largest power of two that
    divides the vocab), the argmax over those maxima, then the argmax inside the winning slice:
    XLA's CPU backend runs the first as a vectorized reduction and jnp.argmax's paired (value,
    index) reduction as a scalar loop (several times slower; docs/BENCHMARKS.md).
    One difference: XLA's CPU max skips NaN, so for a row holding NaN the result can differ from
    jnp.argmax's first NaN.
    """
    batch, vocab = logits.shape
    width = math.gcd(vocab, 128)  # slices must tile the vocab: padding would copy the logits
    if width < 16:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    slices = logits.reshape(batch, vocab // width, width)
    best_slice = jnp.argmax(slices.max(axis=-1), axis=-1)
    within = jnp.take_along_axis(slices, best_slice[:, None, None], axis=1)[:, 0]
    return (best_slice * width + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def apply_penalties(logits, state: SamplerState, params: SamplingTensors):
    """vLLM's rules: repetition over prompt and output tokens; presence/frequency over output."""
    counts = state.output_counts
    seen = state.prompt_mask | (counts > 0)
    penalty = params.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - params.frequency_penalty[:, None] * counts
    return logits - params.presence_penalty[:, None] * (counts > 0)


def apply_top_k_top_p(logits, top_k, top_p):
    """Masks (to -inf) tokens outside each row's top-k, then outside its nucleus of mass top_p.

    Ties at a threshold are kept. One descending sort serves both masks.
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth_value, _NEG_INF, logits)
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
    sorted_probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, _NEG_INF), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # top_p >= 1 keeps everything, even where float32 sums of the tail round up to 1.
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    num_kept = jnp.maximum(jnp.sum(in_nucleus & in_top_k, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, _NEG_INF, logits)


def apply_min_p(logits, min_p):
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, _NEG_INF)


def token_logprobs(raw: jax.Array, tokens: jax.Array, num: int) -> tuple:
    """(tokens' logprobs [batch], top ids [batch, num], top logprobs [batch, num]) from
    log-softmaxed logits [batch, vocab]."""
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(raw, max(num, 1))
    return chosen, top_ids[:, :num], top_values[:, :num]


def sample(logits, params: SamplingTensors, state: SamplerState, flags: SamplerFlags):
    """Picks one token per row from logits [batch, vocab] (float32).

    Returns (tokens [batch] int32, logprobs or None, new state). logprobs, when flags ask, is
    (chosen token's logprob [batch], top ids [batch, N], top logprobs [batch, N]) of the raw
    model distribution.
    """
    batch, vocab = logits.shape
    logprobs = None
    if flags.num_logprobs is not None:
        raw = jax.nn.log_softmax(logits, axis=-1)
    if flags.use_penalties:
        logits = apply_penalties(logits, state, params)
    if flags.use_min_tokens:
        banned = state.stop_token_mask & (state.num_generated < params.min_tokens)[:, None]
        logits = jnp.where(banned, _NEG_INF, logits)
    tokens = argmax(logits)
    if not flags.all_greedy:
        temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
        scaled = logits / temperature[:, None]
        if flags.use_top_k_top_p:
            scaled = apply_top_k_top_p(scaled, params.top_k, params.top_p)
        if flags.use_min_p:
            scaled = apply_min_p(scaled, params.min_p)
        step_keys = jax.vmap(jax.random.fold_in)(params.keys, state.num_generated)
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,)))(step_keys)
        sampled = argmax(scaled + gumbel)
        tokens = jnp.where(params.temperature > 0, sampled, tokens)
    if flags.num_logprobs is not None:
        logprobs = token_logprobs(raw, tokens, flags.num_logprobs)
    counts = state.output_counts
    if flags.use_penalties:
        counts = counts.at[jnp.arange(batch), tokens].add(1)
    state = dataclasses.replace(state, num_generated=state.num_generated + 1,
                                output_counts=counts)
    return tokens, logprobs, state
