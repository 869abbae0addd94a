"""The boundary: one scheduler output -> fixed-shape numpy arrays for the device step.

Tokens are flat: first one row per decode (a request computing a single token), then the tokens
of the prefill chunks, back to back. Prefill attention runs over tiles of PREFILL_TILE queries of
one request, which gather their tokens from the flat prefill part (a chunk's last tile is padded;
the flat tokens, which the dense layers compute, are not). Decode rows and prefill tiles attend
through work items, one chunk of the row's (tile's) blocks each, up to its furthest query.
Dimensions are padded to buckets (decode rows to multiples of 8 up to 64, sampling rows to 1, 2,
4, then likewise; prefill tokens to multiples of 32 up to 128 and of 128 up to 1024, work items
to multiples of 4 x items per iteration, powers of two beyond; tiles to powers of two), so the
step compiles once per bucket combination.
Padding tokens have position -1 (they see no key) and an out-of-range slot (their keys are
dropped); padding sampling rows are greedy and ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from folojax.engine.buckets import bucket, stepped_bucket
from folojax.engine.request import Request
from folojax.engine.sampling_inputs import PADDING_ROW, sampler_flags, sampling_tensors
from folojax.engine.sampling_inputs import stop_token_ids as banned_token_ids
from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput
from folojax.ops.paged_attention import ChunkSizes, WorkItems, chunk_blocks
from folojax.ops.sampling import SamplerFlags, SamplingTensors

PREFILL_TILE = 64  # queries per prefill attention row
ROW_MULTIPLE = 8  # decode rows and sampling rows: 8, 16, ..., 64, 128, 256, ...
SHORT_PREFILL_MULTIPLE = 32  # prefill tokens: 32, 64, 96, 128, then as below
PREFILL_TOKEN_MULTIPLE = 128  # 256, 384, ..., 1024, 2048, ...


def _padded(n: int, minimum: int) -> int:
    return 0 if n == 0 else bucket(n, minimum)


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

    @property
    def num_decode_rows(self) -> int:
        return self.token_ids.shape[0] - self.token_tile_indices.shape[0]


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


def sampling_rows_bucket(n: int) -> int:
    """Sampling rows pad to 1, 2, 4, 8, then multiples of 8: each row costs a vocab-sized logits
    row (on CPU, 8 rows of Qwen3's 151,936 logits take 2.4x as long as one)."""
    return bucket(n, 1) if 0 < n < ROW_MULTIPLE else stepped_bucket(n, ROW_MULTIPLE)


def prefill_token_bucket(n: int) -> int:
    """Short prefills (a prompt's tail after a prefix-cache hit, a last chunk) pad to multiples
    of 32, longer ones to multiples of 128: a 32-token suffix computes 32 tokens, not 128."""
    if n <= 4 * SHORT_PREFILL_MULTIPLE:
        return stepped_bucket(n, SHORT_PREFILL_MULTIPLE)
    return stepped_bucket(n, PREFILL_TOKEN_MULTIPLE)


def build_step(output: SchedulerOutput, block_tables: dict[str, list[int]], block_size: int,
               num_slots: int, vocab_size: int, eos_token_ids: tuple[int, ...],
               chunks: ChunkSizes, in_flight_rows: dict[str, int] | None = None) -> StepBatch:
    """The step's arrays. `in_flight_rows` maps each request that the step in flight samples
    for to its sampling row there: a token of this step that is not read back yet comes from
    that row (see StepInputs.token_sources)."""
    decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
    prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
    num_rows = stepped_bucket(len(decodes), ROW_MULTIPLE)
    num_prefill_tokens = prefill_token_bucket(sum(s.num_new_tokens for s in prefills))
    num_tokens = num_rows + num_prefill_tokens
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.full(num_tokens, -1, np.int32)
    slot_mapping = np.full(num_tokens, num_slots, np.int32)
    token_sources = np.full(num_tokens, -1, np.int32)
    sample_indices, sampling_requests = [], []

    def place(start: int, item: ScheduledRequest) -> None:
        request, n, begin = item.request, item.num_new_tokens, item.start
        known = request.all_token_ids[begin:begin + n]
        token_ids[start:start + len(known)] = known
        if len(known) < n:  # its last token is the one the step in flight samples
            assert len(known) == n - 1, "only the step in flight has tokens not read back"
            token_sources[start + n - 1] = in_flight_rows[request.request_id]
        positions[start:start + n] = np.arange(begin, begin + n)
        table = np.asarray(block_tables[request.request_id], np.int32)
        slot_mapping[start:start + n] = (table[positions[start:start + n] // block_size]
                                         * block_size + positions[start:start + n] % block_size)
        if item.samples:
            sample_indices.append(start + n - 1)
            sampling_requests.append(request)

    for row, item in enumerate(decodes):
        place(row, item)
    tile_starts, tile_tables = [], []  # per tile: first prefill token, block table
    start = 0
    for item in prefills:
        place(num_rows + start, item)
        for offset in range(0, item.num_new_tokens, PREFILL_TILE):
            tile_starts.append((start + offset, start + item.num_new_tokens))
            tile_tables.append(block_tables[item.request.request_id])
        start += item.num_new_tokens

    num_tiles = _padded(len(tile_starts), 1)  # 1, 2, 4, 8, ...
    tile_token_indices = np.full((num_tiles, PREFILL_TILE), num_prefill_tokens, np.int32)
    token_tile_indices = np.zeros(num_prefill_tokens, np.int32)
    for tile, (first, end) in enumerate(tile_starts):
        tokens = np.arange(first, min(first + PREFILL_TILE, end))
        tile_token_indices[tile, :len(tokens)] = tokens
        token_tile_indices[tokens] = tile * PREFILL_TILE + np.arange(len(tokens))
    prefill_positions = np.append(positions[num_rows:], -1)  # index num_prefill_tokens: padding
    tile_positions = prefill_positions[tile_token_indices]
    tile_last_positions = tile_positions[:len(tile_tables)].max(axis=1, initial=-1)

    num_sampling_rows = sampling_rows_bucket(len(sampling_requests))
    indices = np.zeros(num_sampling_rows, np.int32)
    indices[:len(sample_indices)] = sample_indices
    inputs = StepInputs(
        token_ids, token_sources, positions, slot_mapping,
        decode_items=work_items([block_tables[s.request.request_id] for s in decodes],
                                positions[:len(decodes)], block_size, chunks.decode,
                                chunks.decode_items),
        tile_token_indices=tile_token_indices, tile_positions=tile_positions,
        token_tile_indices=token_tile_indices,
        prefill_items=work_items(tile_tables, tile_last_positions, block_size, chunks.prefill,
                                 chunks.prefill_items),
        sample_indices=indices)
    sampler, flags = build_sampler(sampling_requests, num_sampling_rows, vocab_size,
                                   eos_token_ids)
    return StepBatch(inputs, sampler, flags, sampling_requests)


def work_items(tables: list[list[int]], last_positions: np.ndarray, block_size: int,
               keys_per_item: int, items_per_iteration: int) -> WorkItems:
    """Splits each row's keys, up to its furthest query's position, into work items of
    keys_per_item keys (whole blocks); items are padded to a bucket that is a multiple of
    items_per_iteration."""
    per_item = chunk_blocks(block_size, keys_per_item)
    counts = -(-(np.asarray(last_positions, np.int64) + 1) // (per_item * block_size))
    num_real = int(counts.sum())
    num_items = stepped_bucket(num_real, 4 * items_per_iteration)
    rows = np.zeros(num_items, np.int32)
    blocks = np.zeros((num_items, per_item), np.int32)
    starts = np.full(num_items, np.iinfo(np.int32).max // 2, np.int32)
    rows[:num_real] = np.repeat(np.arange(len(tables)), counts)
    first = 0
    for table, count in zip(tables, counts, strict=True):
        row_blocks = np.zeros(count * per_item, np.int32)
        used = min(len(table), len(row_blocks))
        row_blocks[:used] = table[:used]
        blocks[first:first + count] = row_blocks.reshape(count, per_item)
        starts[first:first + count] = np.arange(count) * per_item * block_size
        first += count
    return WorkItems(rows, blocks, starts,
                     num_iterations=np.int32(-(-num_real // items_per_iteration)))


def build_sampler(requests: list[Request], num_rows: int, vocab_size: int,
                  eos_token_ids: tuple[int, ...]) -> tuple[SamplerInputs, SamplerFlags]:
    samplings = [r.sampling for r in requests]
    flags = sampler_flags(samplings)
    rows = samplings + [PADDING_ROW] * (num_rows - len(requests))
    keys = np.zeros((num_rows, 2), np.uint32)
    if requests:
        keys[:len(requests)] = np.stack([r.key_data for r in requests])
    num_generated = np.zeros(num_rows, np.int32)
    # The output index each row samples (its key is folded with it): outputs read back, plus
    # those in flight before this step's own placeholder.
    num_generated[:len(requests)] = [len(r.output_token_ids) + r.num_output_placeholders - 1
                                     for r in requests]
    if any(r.sampling.uses_penalties and r.num_output_placeholders > 1 for r in requests):
        raise RuntimeError("penalties need every output token on the host: a request that "
                           "uses them may have no token in flight")

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
