"""The boundary, host side: one scheduler output -> the fixed-shape arrays of one device step
(folojax/ops/step_inputs.py says what each array means).

A prefill chunk's last attention tile is padded; the flat tokens, which the dense layers
compute, are not. Decode rows and prefill tiles attend through work items, one chunk of the
row's (tile's) blocks each, up to its furthest query. Dimensions are padded to buckets (decode
and sampling rows: rows_bucket; prefill tokens to multiples of 32 up to 128 and of 128 up to
1024; work items to a ChunkSizes bucket times a power of two; tiles to powers of two), so the
step compiles once per bucket combination. Sampling rows follow the order of the scheduled
requests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from folojax.ops.paged_attention import ChunkSizes, WorkItems, chunk_blocks
from folojax.ops.sampling import SamplerFlags
from folojax.ops.step_inputs import PREFILL_TILE, DecodeStepsInputs, SamplerInputs, StepInputs
from folojax.runner.buckets import bucket, stepped_bucket
from folojax.runner.sampling_inputs import build_sampler, logprobs_bucket, stop_token_ids

if TYPE_CHECKING:
    from folojax.engine.request import Request
    from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput

ROW_MULTIPLE = 8  # decode rows and sampling rows: 8, 16, ..., 64, 128, 256, ...
SHORT_PREFILL_MULTIPLE = 32  # prefill tokens: 32, 64, 96, 128, then as below
PREFILL_TOKEN_MULTIPLE = 128  # 256, 384, ..., 1024, 2048, ...


def _padded(n: int, minimum: int) -> int:
    return 0 if n == 0 else bucket(n, minimum)


@dataclasses.dataclass
class StepBatch:
    inputs: StepInputs
    sampler: SamplerInputs
    flags: SamplerFlags
    sampling_requests: list[Request]  # sampling row i belongs to sampling_requests[i]
    # Prompt-logprob entry j: (request, index of the prompt token it scores); see StepInputs.
    prompt_logprob_entries: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    decode_steps: DecodeStepsInputs | None = None  # a step of several tokens per row


@dataclasses.dataclass(frozen=True, order=True)
class StepSizes:
    """A step's padded dimensions: decode (and, beside no prefill, sampling) rows, prefill
    tokens, prefill tiles, and the decode and prefill work items."""

    rows: int = 0
    prefill_tokens: int = 0
    tiles: int = 0
    decode_items: int = 0
    prefill_items: int = 0

    @classmethod
    def of(cls, batch: StepBatch) -> StepSizes:
        inputs = batch.inputs
        tiles = inputs.tile_token_indices.shape[0]
        return cls(inputs.num_decode_rows, inputs.token_tile_indices.shape[0], tiles,
                   inputs.decode_items.rows.shape[0], inputs.prefill_items.rows.shape[0])

    def covers(self, other: StepSizes) -> bool:
        """Every dimension at least other's, and prefill tiles (zero or not) alike."""
        return (all(a >= b for a, b in zip(dataclasses.astuple(self),
                                          dataclasses.astuple(other), strict=True))
                and (self.tiles == 0) == (other.tiles == 0))


def rows_bucket(n: int, coarse: bool = False) -> int:
    """Decode rows and sampling rows pad to 1, 2, 4, 8, then multiples of 8: a sampling row
    costs a vocab-sized logits row, and on CPU XLA's matmul of a few rows reads the weights
    more slowly than its matrix-vector product of one (docs/BENCHMARKS.md). `coarse` (a step
    that also prefills, whose cost its prefill tokens dominate): powers of two, so that the
    steps of a ramp-up, each with a few more decode rows, share compiles."""
    if n == 0:
        return 0
    return bucket(n, 1) if n < ROW_MULTIPLE or coarse else stepped_bucket(n, ROW_MULTIPLE)


def max_rows_bucket(max_num_seqs: int) -> int:
    """The most sampling rows a step of an engine running max_num_seqs requests can have."""
    return rows_bucket(max_num_seqs, coarse=True)


def prefill_token_bucket(n: int) -> int:
    """Short prefills (a prompt's tail after a prefix-cache hit, a last chunk) pad to multiples
    of 32, longer ones to multiples of 128: a 32-token suffix computes 32 tokens, not 128."""
    if n <= 4 * SHORT_PREFILL_MULTIPLE:
        return stepped_bucket(n, SHORT_PREFILL_MULTIPLE)
    return stepped_bucket(n, PREFILL_TOKEN_MULTIPLE)


def build_step(output: SchedulerOutput, block_tables: dict[str, list[int]], block_size: int,
               num_slots: int, vocab_size: int, eos_token_ids: tuple[int, ...],
               chunks: ChunkSizes, in_flight_rows: dict[str, int] | None = None,
               at_least: StepSizes | None = None) -> StepBatch:
    """The step's arrays. `in_flight_rows` maps each request that the step in flight samples
    for to its sampling row there: a token of this step that is not read back yet comes from
    that row (see StepInputs.token_sources). `at_least`: pad each dimension to at least these
    sizes (past its bucket), to run at the shape of a step already compiled (ModelRunner)."""
    floor = at_least or StepSizes()
    decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
    prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
    sampling = [item for item in output.scheduled if item.samples]
    # Beside a prefill, decode rows (padding ones too, if it has none) and sampling rows share
    # one coarse bucket (see rows_bucket): a prefill step with no decodes shares its compile with
    # the next, which decodes what it admitted.
    num_rows = max(floor.rows, rows_bucket(max(len(decodes), len(sampling)), coarse=True)
                   if prefills else rows_bucket(len(decodes)))
    num_prefill_tokens = max(floor.prefill_tokens,
                             prefill_token_bucket(sum(s.num_new_tokens for s in prefills)))
    num_tokens = num_rows + num_prefill_tokens
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.full(num_tokens, -1, np.int32)
    slot_mapping = np.full(num_tokens, num_slots, np.int32)
    token_sources = np.full(num_tokens, -1, np.int32)
    sample_index: dict[int, int] = {}  # id(scheduled item) -> flat token it samples from
    prompt_logprobs: list[tuple[int, int, Request, int]] = []  # flat token, target, request, i

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
            sample_index[id(item)] = start + n - 1
        if request.sampling.prompt_logprobs is not None:
            # Position q's logits score the token at q + 1: prompt tokens 1.. are scored from
            # the positions before them.
            first = request.num_prefix_tokens
            last = first + request.num_prompt_tokens - 1  # the last prompt token scores none
            for q in range(max(begin, first), min(begin + n, last)):
                prompt_logprobs.append((start + q - begin, request.all_token_ids[q + 1], request,
                                        q + 1 - first))

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

    num_tiles = max(floor.tiles, _padded(len(tile_starts), 1))  # 1, 2, 4, 8, ...
    tile_token_indices = np.full((num_tiles, PREFILL_TILE), num_prefill_tokens, np.int32)
    token_tile_indices = np.zeros(num_prefill_tokens, np.int32)
    for tile, (first, end) in enumerate(tile_starts):
        tokens = np.arange(first, min(first + PREFILL_TILE, end))
        tile_token_indices[tile, :len(tokens)] = tokens
        token_tile_indices[tokens] = tile * PREFILL_TILE + np.arange(len(tokens))
    decode_steps = (_decode_steps(output, block_tables, block_size, num_slots, num_rows,
                                  vocab_size, eos_token_ids)
                    if output.num_steps > 1 else None)
    prefill_positions = np.append(positions[num_rows:], -1)  # index num_prefill_tokens: padding
    tile_positions = prefill_positions[tile_token_indices]
    tile_last_positions = tile_positions[:len(tile_tables)].max(axis=1, initial=-1)

    sampling_requests = [item.request for item in sampling]
    num_sampling_rows = num_rows if prefills else max(floor.rows, rows_bucket(len(sampling)))
    indices = np.zeros(num_sampling_rows, np.int32)
    indices[:len(sampling)] = [sample_index[id(item)] for item in sampling]
    inputs = StepInputs(
        token_ids, token_sources, positions, slot_mapping,
        decode_items=work_items([block_tables[s.request.request_id] for s in decodes],
                                positions[:len(decodes)] + output.num_steps - 1, block_size,
                                chunks.decode,
                                chunks.decode_items,
                                chunks.work_items_bucket(chunks.decode_items),
                                keep_a_bucket=num_rows > 0, min_items=floor.decode_items),
        tile_token_indices=tile_token_indices, tile_positions=tile_positions,
        token_tile_indices=token_tile_indices,
        prefill_items=work_items(tile_tables, tile_last_positions, block_size, chunks.prefill,
                                 chunks.prefill_items,
                                 chunks.work_items_bucket(chunks.prefill_items),
                                 min_items=floor.prefill_items),
        sample_indices=indices,
        prompt_logprob_indices=_padded_column([e[0] for e in prompt_logprobs]),
        prompt_logprob_targets=_padded_column([e[1] for e in prompt_logprobs]))
    sampler, flags = build_sampler(sampling_requests, num_sampling_rows, vocab_size,
                                   eos_token_ids, in_flight_rows, output.num_steps)
    if prompt_logprobs:
        flags = dataclasses.replace(flags, num_prompt_logprobs=logprobs_bucket(
            max(entry[2].sampling.prompt_logprobs for entry in prompt_logprobs)))
    return StepBatch(inputs, sampler, flags, sampling_requests,
                     [(request, index) for _, _, request, index in prompt_logprobs], decode_steps)


def _decode_steps(output: SchedulerOutput, block_tables: dict[str, list[int]], block_size: int,
                  num_slots: int, num_rows: int, vocab_size: int,
                  eos_token_ids: tuple[int, ...]) -> DecodeStepsInputs:
    """Each decode row's cache slots for its output.num_steps tokens, and its stop tokens; steps
    pad to a power of two (the padding steps do not run)."""
    num_steps = output.num_steps
    if any(item.num_new_tokens != 1 or not item.samples for item in output.scheduled):
        raise ValueError("a step of several tokens per row is made of decodes alone")
    slots = np.full((bucket(num_steps, 1), num_rows), num_slots, np.int32)
    stops = [stop_token_ids(item.request.sampling, eos_token_ids) for item in output.scheduled]
    stop_ids = np.full((num_rows, bucket(max(map(len, stops), default=0), 4)), vocab_size,
                       np.int32)
    for row, ids in enumerate(stops):
        stop_ids[row, :len(ids)] = ids
    for row, item in enumerate(output.scheduled):
        table = np.asarray(block_tables[item.request.request_id], np.int32)
        step_positions = item.start + np.arange(num_steps)
        slots[:num_steps, row] = (table[step_positions // block_size] * block_size
                                  + step_positions % block_size)
    return DecodeStepsInputs(slots, np.int32(num_steps), stop_ids)


def _padded_column(values: list[int]) -> np.ndarray:
    """int32 values padded with zeros to a prefill-token bucket (none: empty)."""
    column = np.zeros(prefill_token_bucket(len(values)) if values else 0, np.int32)
    column[:len(values)] = values
    return column


def work_items(tables: list[list[int]], last_positions: np.ndarray, block_size: int,
               keys_per_item: int, items_per_iteration: int,
               items_bucket: int | None = None, keep_a_bucket: bool = False,
               min_items: int = 0) -> WorkItems:
    """Splits each row's keys, up to its furthest query's position, into work items of
    keys_per_item keys (whole blocks). Items are padded to `items_bucket` (default 4 x
    items_per_iteration) times a power of two: the count changes as contexts grow, and a coarse
    bucket keeps that from recompiling often. `keep_a_bucket`: one bucket even with no items
    (rows that are all padding). `min_items`: pad to at least this many."""
    per_item = chunk_blocks(block_size, keys_per_item)
    counts = -(-(np.asarray(last_positions, np.int64) + 1) // (per_item * block_size))
    num_real = int(counts.sum())
    items_bucket = items_bucket or 4 * items_per_iteration
    num_items = (bucket(max(num_real, 1), items_bucket) if keep_a_bucket
                 else _padded(num_real, items_bucket))
    num_items = max(num_items, min_items)
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
