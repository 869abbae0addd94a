"""ModelRunner: the params, the device cache, the attention implementation and the jitted step,
behind `execute(scheduler output, previous step) -> step`. The engine core and folojax.generate
both drive it; tensor parallelism, speculative decoding and warm-up belong here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm.auto import tqdm

from folojax.config import ModelConfig
from folojax.model.step import paged_decode_steps, paged_logits, paged_step
from folojax.ops.attention_backends import check_backend, platform_name
from folojax.ops.paged_attention import ChunkSizes
from folojax.ops.paged_kv_cache import PagedKVCache, copy_blocks
from folojax.ops.sampling import SamplerFlags
from folojax.runner.prepare import StepBatch, StepSizes, build_step, max_rows_bucket

if TYPE_CHECKING:
    from folojax.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)
_IN_FLIGHT: set[concurrent.futures.Future] = set()  # every runner's background compiles

# A step of a shape not compiled yet runs at a compiled shape at least as large in every
# dimension (padding rows, tokens and work items change no result), if that does not double its
# prefill tokens: the last steps of a wave of requests, a few rows fewer each, and a short
# prefill beside a long one then wait for no compile. A shape met this many times (by default)
# compiles in a background thread (its steps run padded until that is done), so that a shape
# that keeps coming back runs at its own size and a rare one costs no compile. A step that no
# compiled shape covers compiles where it is dispatched.
PADDED_STEPS_BEFORE_COMPILE = 8


@dataclasses.dataclass
class StepResult:
    """A dispatched step: what was scheduled, its arrays, and its results (device arrays, maybe
    still being computed)."""

    output: SchedulerOutput
    batch: StepBatch
    tokens: jax.Array  # [max sampling rows]: sampling rows first
    logprobs: tuple | None
    prompt_logprobs: tuple | None = None  # per batch.prompt_logprob_entries (see paged_step)

    def in_flight_rows(self) -> dict[str, int]:
        """Request id -> its sampling row in this step."""
        return {r.request_id: row for row, r in enumerate(self.batch.sampling_requests)}


class ModelRunner:
    """The model on its device: one call per step, the cache kept (and donated) across calls."""

    def __init__(self, params, config: ModelConfig, cache: PagedKVCache, max_num_seqs: int,
                 eos_token_ids: tuple[int, ...] | None = None, chunks: ChunkSizes | None = None,
                 background_compile: bool = True,
                 padded_steps_before_compile: int = PADDED_STEPS_BEFORE_COMPILE,
                 attention_backend: str = "auto"):
        """attention_backend: a name of folojax.list_attention_backends() or "auto", checked
        here against the model's head_dim and the cache's block size and dtype (a ValueError
        names the limit); `chunks`, if given, replaces its work items' sizes."""
        self.params = params
        self.config = config
        self.cache = cache
        self.eos_token_ids = config.eos_token_ids if eos_token_ids is None else eos_token_ids
        backend = check_backend(attention_backend, config.head_dim, cache.block_size,
                                cache.k[0].dtype)
        self.chunks = chunks or backend.chunk_sizes(platform_name())
        # A step's tokens come back padded to the most sampling rows a step can have.
        self._no_tokens = np.zeros(max_rows_bucket(max_num_seqs), np.int32)
        self._compiled: set = set()  # the step_signature of every shape compiled
        # Per SamplerFlags: (StepSizes, signature) of each shape compiled.
        self._compiled_sizes: collections.defaultdict = collections.defaultdict(list)
        # signature -> (its StepSizes, the background compile of its shape)
        self._compiling: dict[tuple, tuple[StepSizes, concurrent.futures.Future]] = {}
        self._padded_steps: collections.Counter = collections.Counter()  # by signature
        self._failed_in_background: set = set()  # signatures: these compile at dispatch
        self.padded_steps_before_compile = padded_steps_before_compile
        self.num_dispatch_compiles = 0  # steps that compiled where they were dispatched
        self._compiler = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="folojax-compile") if background_compile else None)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def attention_backend(self) -> str:
        return self.chunks.backend

    def prepare(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
                previous: StepResult | None = None, at_least: StepSizes | None = None
                ) -> StepBatch:
        return build_step(output, block_tables, self.block_size, self.cache.num_slots,
                          self.config.vocab_size, self.eos_token_ids, self.chunks,
                          previous.in_flight_rows() if previous is not None else None, at_least)

    def _compiled_shape(self, batch: StepBatch, output: SchedulerOutput,
                        block_tables: dict[str, list[int]], previous: StepResult | None,
                        previous_tokens) -> StepBatch:
        """The batch, or the same step padded to a compiled shape (see the comment on top)."""
        signature = step_signature(batch)
        self._collect_compiles()
        if signature in self._compiled:
            return batch
        sizes = StepSizes.of(batch)
        cover = (None if signature in self._failed_in_background
                 else self._padded_to_a_cover(batch, sizes, output, block_tables, previous))
        if cover is not None:
            self._padded_steps[signature] += 1
            if (self._padded_steps[signature] < self.padded_steps_before_compile
                    or signature in self._compiling):
                return cover
            if self._compiler is not None:
                logger.info("step shape %s compiles in the background (%d steps ran padded)",
                            sizes, self._padded_steps[signature])
                future = self._compiler.submit(_compile_step,
                                               self._abstract(batch, previous_tokens),
                                               self.config, batch.flags, self.chunks)
                _IN_FLIGHT.add(future)
                future.add_done_callback(_IN_FLIGHT.discard)
                self._compiling[signature] = (sizes, future)
                return cover
        # No cover for this step (a shape compiling in the background may not cover a step
        # padded past it): wait for its compile under way, else compile at dispatch.
        in_background = self._compiling.pop(signature, None)
        if in_background is None or not _compiled_ok(in_background[1]):
            logger.info("step shape %s compiles where the step is dispatched", sizes)
            self.num_dispatch_compiles += 1
        self._add_compiled(sizes, signature, batch.flags)
        return batch

    def _padded_to_a_cover(self, batch: StepBatch, sizes: StepSizes, output: SchedulerOutput,
                           block_tables: dict[str, list[int]], previous: StepResult | None
                           ) -> StepBatch | None:
        """The step at the smallest compiled shape that covers it, if one does. A shape compiled
        for random sampling covers greedy steps too (its greedy rows take the argmax all the
        same)."""
        for flags in _covering_flags(batch.flags):
            for cover, cover_signature in sorted(self._compiled_sizes[flags],
                                                 key=lambda c: c[0]):
                if not cover.covers(sizes) or cover.prefill_tokens > 2 * sizes.prefill_tokens:
                    continue
                padded = dataclasses.replace(
                    self.prepare(output, block_tables, previous, at_least=cover), flags=flags)
                if step_signature(padded) == cover_signature:
                    return padded
        return None

    def _abstract(self, batch: StepBatch, previous_tokens) -> tuple:
        """paged_step's array arguments for this batch, as shapes and dtypes only."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                            (self.params, self.cache, batch.inputs, batch.sampler,
                             previous_tokens))

    def _collect_compiles(self) -> None:
        """Moves finished background compiles among the compiled shapes (a failed one: its step
        compiles where it is dispatched instead)."""
        for signature, (sizes, future) in list(self._compiling.items()):
            if future.done():
                del self._compiling[signature]
                if _compiled_ok(future):
                    self._add_compiled(sizes, signature, signature[0])
                else:
                    self._failed_in_background.add(signature)

    def _add_compiled(self, sizes: StepSizes, signature: tuple, flags) -> None:
        self._compiled.add(signature)
        self._compiled_sizes[flags].append((sizes, signature))

    def warm_up(self, steps, progress: bool = True) -> int:
        """Compiles paged_step, now, for each (scheduler output, block tables, StepSizes to pad
        to) not compiled yet (engine/warm_up.py chooses them); returns how many it compiled."""
        compiled = 0
        for output, tables, sizes in tqdm(steps, desc="Compiling step shapes", unit="shape",
                                          disable=not progress):
            batch = self.prepare(output, tables, at_least=sizes)
            signature = step_signature(batch)
            if signature not in self._compiled:
                _compile_step(self._abstract(batch, self._no_tokens), self.config, batch.flags,
                              self.chunks)
                self._add_compiled(StepSizes.of(batch), signature, batch.flags)
                compiled += 1
        return compiled

    def wait_for_compiles(self) -> None:
        """Waits for the background compiles under way (tests, benchmarks)."""
        concurrent.futures.wait([future for _, future in self._compiling.values()])
        self._collect_compiles()

    def execute(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
                previous: StepResult | None = None) -> StepResult:
        """Performs the output's block copies, then dispatches the step without waiting for it.
        Tokens the previous step (maybe still in flight) samples are read from it on the
        device."""
        if output.block_copies:
            self.cache = copy_blocks(self.cache, *_copy_block_arrays(output.block_copies,
                                                                     self.cache.num_blocks))
        previous_tokens = previous.tokens if previous is not None else self._no_tokens
        batch = self.prepare(output, block_tables, previous)
        if batch.decode_steps is not None:
            return self._execute_decode_steps(output, batch, previous_tokens)
        batch = self._compiled_shape(batch, output, block_tables, previous, previous_tokens)
        tokens, logprobs, prompt_logprobs, self.cache = paged_step(
            self.params, self.cache, batch.inputs, batch.sampler, previous_tokens, self.config,
            batch.flags, self.chunks)
        return StepResult(output, batch, tokens, logprobs, prompt_logprobs)

    def _execute_decode_steps(self, output: SchedulerOutput, batch: StepBatch, previous_tokens
                              ) -> StepResult:
        """Dispatches a step of several tokens per row (paged_decode_steps). Its shapes (rows and
        steps buckets) compile where they are first dispatched, as no padding to another
        shape's compile applies."""
        signature = ("decode_steps", *step_signature(batch),
                     batch.decode_steps.slot_mapping.shape,
                     batch.decode_steps.stop_token_ids.shape)
        if signature not in self._compiled:
            logger.info("decode-steps shape %s compiles where the step is dispatched",
                        signature[1:])
            self.num_dispatch_compiles += 1
            self._compiled.add(signature)
        tokens, logprobs, self.cache, _ = paged_decode_steps(
            self.params, self.cache, batch.inputs, batch.decode_steps, batch.sampler,
            previous_tokens, self.config, batch.flags, self.chunks)
        return StepResult(output, batch, tokens, logprobs)

    def logits(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> jax.Array:
        """Writes the scheduled tokens' keys and values; returns the logits [sampling rows,
        vocab] of each sampling request's last token, in scheduled order (padding rows last)."""
        batch = self.prepare(output, block_tables)
        logits, self.cache = paged_logits(self.params, self.cache, batch.inputs, self.config,
                                          self.chunks)
        return logits


def wait_for_background_compiles() -> None:
    """Waits for every runner's background compiles under way (tests counting compiles)."""
    concurrent.futures.wait(list(_IN_FLIGHT))


def _covering_flags(flags: SamplerFlags) -> list[SamplerFlags]:
    """The sampler flags whose compiled steps can run a step of these flags."""
    return [flags] + ([dataclasses.replace(flags, all_greedy=False)] if flags.all_greedy else [])


def _compile_step(abstract_arguments: tuple, config: ModelConfig, flags, chunks) -> None:
    """Compiles paged_step for these argument shapes, into jit's cache."""
    paged_step.lower(*abstract_arguments, config, flags, chunks).compile()


def _compiled_ok(future: concurrent.futures.Future) -> bool:
    """Waits for a background compile: True if it compiled, else a warning and False."""
    error = future.exception()
    if error is not None:
        logger.warning("a background compile of paged_step failed (%s: %s); the step compiles "
                       "when it runs", type(error).__name__, error)
    return error is None


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
