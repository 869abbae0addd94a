"""The boundary: one scheduler output -> fixed-shape numpy arrays for the device step.

Tokens are flat: first one row per decode (a request computing a single token), then the tokens
of the prefill chunks. Every dimension is padded to a power-of-two bucket, so the step compiles
once per bucket combination. Padding tokens write to an out-of-range slot (dropped) and attend to
nothing; padding sampling rows are greedy and ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from folojax.engine.buckets import bucket
from folojax.engine.request import Request
from folojax.engine.sampling_inputs import PADDING_ROW, sampler_flags, sampling_tensors
from folojax.engine.sampling_inputs import stop_token_ids as banned_token_ids
from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput
from folojax.ops.sampling import SamplerFlags, SamplingTensors

MIN_ROWS = 8  # decode rows and sampling rows: 8, 16, 32, ...
MIN_PREFILL_TOKENS = 32
MIN_KEYS = 256  # attended keys per decode row, and in all of a step's prefill chunks


def _padded(n: int, minimum: int) -> int:
    return 0 if n == 0 else bucket(n, minimum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    token_ids: np.ndarray  # [tokens] int32: decode rows, then prefill chunk tokens
    positions: np.ndarray  # [tokens]
    slot_mapping: np.ndarray  # [tokens]: cache slot each token's keys go to (num_slots = drop)
    decode_key_slots: np.ndarray  # [decode rows, keys]
    decode_context_lens: np.ndarray  # [decode rows]
    prefill_query_segments: np.ndarray  # [prefill tokens]: chunk of each token (-1 = padding)
    prefill_key_slots: np.ndarray  # [prefill keys]
    prefill_key_positions: np.ndarray  # [prefill keys]
    prefill_key_segments: np.ndarray  # [prefill keys] (-2 = padding)
    sample_indices: np.ndarray  # [sampling rows]: flat token whose logits each row samples from

    @property
    def num_decode_rows(self) -> int:
        return self.decode_context_lens.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerInputs:
    """Per sampling row: parameters, key data (uint32 [2]) and what penalties and min_tokens
    need, as token-id lists padded with vocab_size (out of range: ignored on device)."""

    tensors: SamplingTensors
    num_generated: np.ndarray  # [rows]
    prompt_token_ids: np.ndarray  # [rows, width] (width 1 when no row uses penalties)
    output_token_ids: np.ndarray  # [rows, width]
    banned_token_ids: np.ndarray  # [rows, width]: stop tokens banned until min_tokens


@dataclasses.dataclass
class StepBatch:
    inputs: StepInputs
    sampler: SamplerInputs
    flags: SamplerFlags
    sampling_requests: list[Request]  # sampling row i belongs to sampling_requests[i]


def build_step(output: SchedulerOutput, block_tables: dict[str, list[int]], block_size: int,
               num_slots: int, vocab_size: int, eos_token_ids: tuple[int, ...]) -> StepBatch:
    decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
    prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
    num_rows = _padded(len(decodes), MIN_ROWS)
    num_prefill_tokens = _padded(sum(s.num_new_tokens for s in prefills), MIN_PREFILL_TOKENS)
    num_tokens = num_rows + num_prefill_tokens
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, num_slots, np.int32)
    sample_indices = []
    sampling_requests = []

    def place(start: int, item: ScheduledRequest) -> None:
        request, n = item.request, item.num_new_tokens
        begin = request.num_computed_tokens
        token_ids[start:start + n] = request.all_token_ids[begin:begin + n]
        positions[start:start + n] = np.arange(begin, begin + n)
        slot_mapping[start:start + n] = _slots(block_tables[request.request_id], block_size,
                                               positions[start:start + n])
        if item.samples:
            sample_indices.append(start + n - 1)
            sampling_requests.append(request)

    for row, item in enumerate(decodes):
        place(row, item)
    start = num_rows
    for item in prefills:
        place(start, item)
        start += item.num_new_tokens

    context_lens = np.zeros(num_rows, np.int32)
    context_lens[:len(decodes)] = [s.request.num_computed_tokens + 1 for s in decodes]
    num_keys = _padded(int(context_lens.max(initial=0)), MIN_KEYS)
    decode_key_slots = np.zeros((num_rows, num_keys), np.int32)
    for row, item in enumerate(decodes):
        decode_key_slots[row] = _slots(block_tables[item.request.request_id], block_size,
                                       np.arange(num_keys))

    query_segments = np.full(num_prefill_tokens, -1, np.int32)
    context = [s.request.num_computed_tokens + s.num_new_tokens for s in prefills]
    num_prefill_keys = _padded(sum(context), MIN_KEYS)
    key_slots = np.zeros(num_prefill_keys, np.int32)
    key_positions = np.zeros(num_prefill_keys, np.int32)
    key_segments = np.full(num_prefill_keys, -2, np.int32)
    query_start = key_start = 0
    for segment, (item, length) in enumerate(zip(prefills, context, strict=True)):
        query_segments[query_start:query_start + item.num_new_tokens] = segment
        key_positions[key_start:key_start + length] = np.arange(length)
        key_slots[key_start:key_start + length] = _slots(
            block_tables[item.request.request_id], block_size, np.arange(length))
        key_segments[key_start:key_start + length] = segment
        query_start += item.num_new_tokens
        key_start += length

    num_sampling_rows = _padded(len(sampling_requests), MIN_ROWS)
    indices = np.zeros(num_sampling_rows, np.int32)
    indices[:len(sample_indices)] = sample_indices
    inputs = StepInputs(token_ids, positions, slot_mapping, decode_key_slots, context_lens,
                        query_segments, key_slots, key_positions, key_segments, indices)
    sampler, flags = build_sampler(sampling_requests, num_sampling_rows, vocab_size,
                                   eos_token_ids)
    return StepBatch(inputs, sampler, flags, sampling_requests)


def _slots(block_ids: list[int], block_size: int, positions: np.ndarray) -> np.ndarray:
    """Cache slots of `positions` in a block table; positions past the table map into its last
    block (only padding keys, which are masked, go there)."""
    table = np.asarray(block_ids, np.int32)
    index = np.minimum(positions // block_size, len(table) - 1)
    return table[index] * block_size + positions % block_size


def build_sampler(requests: list[Request], num_rows: int, vocab_size: int,
                  eos_token_ids: tuple[int, ...]) -> tuple[SamplerInputs, SamplerFlags]:
    samplings = [r.sampling for r in requests]
    flags = sampler_flags(samplings)
    rows = samplings + [PADDING_ROW] * (num_rows - len(requests))
    keys = np.zeros((num_rows, 2), np.uint32)
    if requests:
        keys[:len(requests)] = np.stack([r.key_data for r in requests])
    num_generated = np.zeros(num_rows, np.int32)
    num_generated[:len(requests)] = [len(r.output_token_ids) for r in requests]

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
        banned_token_ids=id_lists([banned_token_ids(r.sampling, eos_token_ids)
                                   for r in requests], flags.use_min_tokens),
    )
    return sampler, flags
