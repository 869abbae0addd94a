"""What one device step consumes: fixed-shape arrays built on the host (folojax/runner/prepare.py)
once per step. Defined here, on the device side, so that device code imports nothing from the
host side.

Tokens are flat: first one row per decode (a request computing a single token), then the tokens
of the prefill chunks, back to back. Prefill attention runs over tiles of PREFILL_TILE queries of
one request, which gather their tokens from the flat prefill part. Padding tokens have position
-1 (they see no key) and an out-of-range slot (their keys are dropped); padding sampling rows are
greedy and ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from folojax.ops.paged_attention import WorkItems
from folojax.ops.sampling import SamplingTensors

PREFILL_TILE = 64  # queries per prefill attention row


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    token_ids: np.ndarray  # [tokens] int32: decode rows, then prefill tokens
    # [tokens]: the sampling row, in the step in flight, of a token not read back yet (it is
    # taken from there on the device); -1 for the tokens in token_ids.
    token_sources: np.ndarray
    positions: np.ndarray  # [tokens] (-1 = padding)
    slot_mapping: np.ndarray  # [tokens]: cache slot each token's keys go to (num_slots = drop)
    decode_items: WorkItems  # attention work items of the decode rows
    tile_token_indices: np.ndarray  # [tiles, PREFILL_TILE]: prefill token of each query
    tile_positions: np.ndarray  # [tiles, PREFILL_TILE] (-1 = padding)
    token_tile_indices: np.ndarray  # [prefill tokens]: where each sits in the flattened tiles
    prefill_items: WorkItems  # attention work items of the prefill tiles
    sample_indices: np.ndarray  # [sampling rows]: flat token whose logits each row samples from
    # Prompt logprobs (SamplingParams.prompt_logprobs), [entries] each, empty when no request
    # asks: the flat token whose logits give an entry, and the prompt token it scores (the
    # next one). Padding entries score token 0 of token 0.
    prompt_logprob_indices: np.ndarray
    prompt_logprob_targets: np.ndarray

    @property
    def num_decode_rows(self) -> int:
        return self.token_ids.shape[0] - self.token_tile_indices.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeStepsInputs:
    """A step of decode rows alone that computes up to `num_steps` tokens per row in one dispatch,
    each row's sampled token the input of its next (the scheduler's num_scheduler_steps). Step i
    runs StepInputs' rows at their positions + i; their work items reach the last step's
    position. The device loop ends early once every row has sampled one of its stop tokens."""

    slot_mapping: np.ndarray  # [max steps, rows]: the cache slot of each row's token at step i
    num_steps: np.ndarray  # [] int32: the steps to run, at most max steps
    # [rows, width]: each row's stop tokens (EOS unless ignore_eos, and stop_token_ids), padded
    # with vocab_size (no token); min_tokens bans them on the device until they may stop.
    stop_token_ids: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerInputs:
    """Per sampling row: parameters, key data (uint32 [2]) and what penalties and min_tokens
    need, as token-id lists padded with vocab_size (out of range: ignored on device)."""

    tensors: SamplingTensors
    num_generated: np.ndarray  # [rows]: the output index each row samples (folded into its key)
    prompt_token_ids: np.ndarray  # [rows, width] (width 1 when no row uses penalties)
    output_token_ids: np.ndarray  # [rows, width]: outputs already read back to the host
    # [rows]: the sampling row, in the step in flight, of an output not read back yet (counted
    # by the penalties from there on the device); -1 for none.
    output_sources: np.ndarray
    banned_token_ids: np.ndarray  # [rows, width]: stop tokens banned until min_tokens
