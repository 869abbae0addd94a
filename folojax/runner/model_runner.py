"""ModelRunner: the params, the device cache, the attention implementation and the jitted step,
behind `execute(scheduler output, previous step) -> step`. The engine core and folojax.generate
both drive it; tensor parallelism, speculative decoding and warm-up belong here.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from folojax.config import ModelConfig
from folojax.model.step import paged_logits, paged_step
from folojax.ops.paged_attention import ChunkSizes, default_chunk_sizes
from folojax.ops.paged_kv_cache import PagedKVCache, copy_blocks
from folojax.runner.prepare import StepBatch, StepSizes, build_step, max_rows_bucket

if TYPE_CHECKING:
    from folojax.engine.scheduler import SchedulerOutput

# A step of a shape not compiled yet runs, its first few times, at a compiled shape at least as
# large in every dimension (padding rows, tokens and work items change no result), if that does
# not double its prefill tokens: the last steps of a wave of requests, a few rows fewer each,
# and a short prefill beside a long one's compile then cost no compile. A shape still met after
# that many steps compiles.
PADDED_STEPS_BEFORE_COMPILE = 8


@dataclasses.dataclass
class StepResult:
    """A dispatched step: what was scheduled, its arrays, and its results (device arrays, maybe
    still being computed)."""

    output: SchedulerOutput
    batch: StepBatch
    tokens: jax.Array  # [max sampling rows]: sampling rows first
    logprobs: tuple | None

    def in_flight_rows(self) -> dict[str, int]:
        """Request id -> its sampling row in this step."""
        return {r.request_id: row for row, r in enumerate(self.batch.sampling_requests)}


class ModelRunner:
    """The model on its device: one call per step, the cache kept (and donated) across calls."""

    def __init__(self, params, config: ModelConfig, cache: PagedKVCache, max_num_seqs: int,
                 eos_token_ids: tuple[int, ...] | None = None, chunks: ChunkSizes | None = None):
        self.params = params
        self.config = config
        self.cache = cache
        self.eos_token_ids = config.eos_token_ids if eos_token_ids is None else eos_token_ids
        self.chunks = chunks or default_chunk_sizes(dtype=cache.k[0].dtype)
        # A step's tokens come back padded to the most sampling rows a step can have.
        self._no_tokens = np.zeros(max_rows_bucket(max_num_seqs), np.int32)
        self._compiled: set = set()  # the step_signature of every step dispatched
        # Per SamplerFlags: (StepSizes, signature) of each shape compiled.
        self._compiled_sizes: collections.defaultdict = collections.defaultdict(list)
        self._padded_steps: collections.Counter = collections.Counter()  # by signature

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def prepare(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
                previous: StepResult | None = None, at_least: StepSizes | None = None
                ) -> StepBatch:
        return build_step(output, block_tables, self.block_size, self.cache.num_slots,
                          self.config.vocab_size, self.eos_token_ids, self.chunks,
                          previous.in_flight_rows() if previous is not None else None, at_least)

    def _compiled_shape(self, batch: StepBatch, output: SchedulerOutput,
                        block_tables: dict[str, list[int]], previous: StepResult | None
                        ) -> StepBatch:
        """The batch, or the same step padded to a compiled shape (see
        PADDED_STEPS_BEFORE_COMPILE)."""
        signature = step_signature(batch)
        if signature in self._compiled:
            return batch
        sizes = StepSizes.of(batch)
        compiled = self._compiled_sizes[batch.flags]
        if self._padded_steps[signature] < PADDED_STEPS_BEFORE_COMPILE:
            for cover, cover_signature in sorted(compiled, key=lambda c: c[0]):
                if not cover.covers(sizes) or cover.prefill_tokens > 2 * sizes.prefill_tokens:
                    continue
                padded = self.prepare(output, block_tables, previous, at_least=cover)
                if step_signature(padded) == cover_signature:
                    self._padded_steps[signature] += 1
                    return padded
        compiled.append((sizes, signature))
        self._compiled.add(signature)
        return batch

    def execute(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
                previous: StepResult | None = None) -> StepResult:
        """Performs the output's block copies, then dispatches the step without waiting for it.
        Tokens the previous step (maybe still in flight) samples are read from it on the
        device."""
        if output.block_copies:
            self.cache = copy_blocks(self.cache, *_copy_block_arrays(output.block_copies,
                                                                     self.cache.num_blocks))
        batch = self._compiled_shape(self.prepare(output, block_tables, previous), output,
                                     block_tables, previous)
        previous_tokens = previous.tokens if previous is not None else self._no_tokens
        tokens, logprobs, self.cache = paged_step(self.params, self.cache, batch.inputs,
                                                  batch.sampler, previous_tokens, self.config,
                                                  batch.flags, self.chunks)
        return StepResult(output, batch, tokens, logprobs)

    def logits(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> jax.Array:
        """Writes the scheduled tokens' keys and values; returns the logits [sampling rows,
        vocab] of each sampling request's last token, in scheduled order (padding rows last)."""
        batch = self.prepare(output, block_tables)
        logits, self.cache = paged_logits(self.params, self.cache, batch.inputs, self.config,
                                          self.chunks)
        return logits


def step_signature(batch: StepBatch) -> tuple:
    """What paged_step compiles for: the flags and every input array's shape."""
    leaves = jax.tree.leaves((batch.inputs, batch.sampler))
    return batch.flags, tuple(np.shape(leaf) for leaf in leaves)


def _copy_block_arrays(copies, num_blocks: int):
    """(source, destination) block ids, padded to a power of two with dropped destinations."""
    num = 1 << (len(copies) - 1).bit_length()
    source = np.zeros(num, np.int32)
    destination = np.full(num, num_blocks, np.int32)
    source[:len(copies)], destination[:len(copies)] = zip(*copies, strict=True)
    return source, destination
