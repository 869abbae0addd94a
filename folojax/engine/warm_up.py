"""Warm-up: the step shapes to compile before the first request, so that later steps run at
one of them (padded), and compile their own shape in the background if it keeps coming back,
rather than wait for a compile (runner/model_runner.py).

Each shape is the largest of its kind, so that it covers every smaller step:
- decode steps of 1, 4, 16, 64, ... rows, up to the most rows a step can have;
- prefill steps of 32, 64, 128, ... tokens (a cover may have at most twice a step's prefill
  tokens), up to max_num_batched_tokens, beside as many decode rows as a step can have;
- with work items for contexts of the longest request, and prefill tiles for chunks of 16
  tokens on average;
- for random sampling, whose steps cover greedy ones too (no penalties, min_p, top-k/top-p or
  logprobs: steps that use them compile their own shapes).
Dummy requests stand for the steps; nothing runs.
"""

from __future__ import annotations

import numpy as np

from folojax.config import EngineConfig
from folojax.engine.request import Request
from folojax.engine.scheduler import ScheduledRequest, SchedulerOutput
from folojax.ops.paged_attention import ChunkSizes, chunk_blocks
from folojax.ops.step_inputs import PREFILL_TILE
from folojax.runner.buckets import bucket
from folojax.runner.prepare import StepSizes, max_rows_bucket, prefill_token_bucket
from folojax.sampling_params import SamplingParams

DECODE_ROWS_RATIO = 4  # decode shapes of 1, 4, 16, ... rows
# Prefill tiles: one per PREFILL_TILE tokens, and one more (a prompt chunk's last, partial
# tile) per this many tokens (a step with more tiles compiles its own shape when it comes).
TOKENS_PER_PARTIAL_TILE = 16
# Random sampling without penalties, min_p, top-k/top-p or logprobs: its shapes cover greedy
# steps too (ModelRunner), and most requests use nothing more.
WARM_SAMPLING = SamplingParams(temperature=1.0)


def warm_up_steps(config: EngineConfig, block_size: int, max_request_len: int,
                  chunks: ChunkSizes) -> list[tuple[SchedulerOutput, dict, StepSizes]]:
    """(scheduler output, block tables, sizes to pad to) of each step shape to compile."""
    scheduler = config.scheduler
    max_rows = max_rows_bucket(scheduler.max_num_seqs)
    max_tokens = prefill_token_bucket(scheduler.max_num_batched_tokens)

    def decode_items(rows: int) -> int:
        return _items(rows, max_request_len, block_size, chunks.decode,
                      chunks.work_items_bucket(chunks.decode_items))

    steps = []
    for rows in _ladder(1, max_rows, DECODE_ROWS_RATIO):
        steps.append(_decode_step(rows, StepSizes(rows=rows, decode_items=decode_items(rows))))
    for tokens in _ladder(prefill_token_bucket(1), max_tokens, 2):
        tiles = bucket(-(-tokens // PREFILL_TILE)
                       + min(scheduler.max_num_seqs, tokens // TOKENS_PER_PARTIAL_TILE), 1)
        steps.append(_prefill_step(tokens, block_size, StepSizes(
            rows=max_rows, prefill_tokens=tokens, tiles=tiles,
            decode_items=decode_items(max_rows),
            prefill_items=_items(tiles, max_request_len, block_size, chunks.prefill,
                                 chunks.work_items_bucket(chunks.prefill_items)))))
    return steps


def _ladder(first: int, last: int, ratio: int) -> list[int]:
    """first, first * ratio, ... while below last, then last."""
    sizes = [first]
    while sizes[-1] < last:
        sizes.append(min(sizes[-1] * ratio, last))
    return sizes


def _items(rows: int, context: int, block_size: int, keys_per_item: int, items_bucket: int
           ) -> int:
    """Work items for `rows` rows (or tiles) each attending to `context` keys, bucketed."""
    per_item = chunk_blocks(block_size, keys_per_item) * block_size
    return bucket(rows * -(-context // per_item), items_bucket)


def _dummy(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, [0] * num_tokens, WARM_SAMPLING, np.zeros(2, np.uint32),
                   max_total_len=num_tokens + 1)


def _decode_step(rows: int, sizes: StepSizes):
    requests = [_dummy(f"warm-up-{i}", 2) for i in range(rows)]  # its 2nd token next
    for request in requests:
        request.num_computed_tokens = 1
    scheduled = [ScheduledRequest(r, 1, 1, True) for r in requests]
    return SchedulerOutput(scheduled, [], []), {r.request_id: [0] for r in requests}, sizes


def _prefill_step(tokens: int, block_size: int, sizes: StepSizes):
    request = _dummy("warm-up", tokens)
    tables = {request.request_id: [0] * -(-tokens // block_size)}
    return SchedulerOutput([ScheduledRequest(request, tokens, 0, True)], [], []), tables, sizes
