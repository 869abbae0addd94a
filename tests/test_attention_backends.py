"""Every attention backend against `reference`, and `reference` against a dense numpy softmax over
each row's own keys, on one step's mix: decode rows of different lengths and a padding row, then
prefill tiles of a whole prompt, of a later chunk of a prompt (its earlier keys cached), of a
prompt after a prefix-cache hit, and a tile ending in padding queries; GQA, MQA and MHA; head_dim
64, 128 and 80; block sizes 8, 16 and 32; float32 and bfloat16 caches. Pallas runs in its
interpreter here (`pallas-interpret`, the same kernel as `pallas`). A backend that cannot serve
a shape says so, naming the limit."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import folojax
from folojax.ops import cpu_kernels
from folojax.ops.attention_backends import (
    BACKENDS,
    check_backend,
    list_attention_backends,
    paged_attention,
    platform_name,
    step_attention,
)
from folojax.ops.paged_attention import AttentionRows
from folojax.runner.prepare import work_items

NUM_BLOCKS = 96
PLATFORM = platform_name()
# Every backend that runs here but the oracle (on a GPU `pallas` itself), and the interpreter.
TESTED = [name for name in list_attention_backends() if name != "reference"]
TESTED.append("pallas-interpret")


@dataclasses.dataclass(frozen=True)
class Shape:
    kv_heads: int
    groups: int
    head_dim: int
    block_size: int
    dtype: str = "float32"


SHAPES = [Shape(2, 3, 64, 16), Shape(1, 4, 64, 16), Shape(4, 1, 64, 16),  # GQA, MQA, MHA
          Shape(2, 2, 128, 16), Shape(2, 2, 80, 16),  # head_dim 128 and a size no kernel tiles
          Shape(2, 3, 64, 8), Shape(2, 3, 64, 32),
          Shape(2, 3, 64, 16, "bfloat16"), Shape(1, 4, 128, 32, "bfloat16")]


def shape_id(shape: Shape) -> str:
    return (f"kv{shape.kv_heads}x{shape.groups}-d{shape.head_dim}-b{shape.block_size}-"
            f"{shape.dtype}")


@dataclasses.dataclass
class Step:
    """One step's attention inputs: decode rows, then prefill tiles, over one cache pool."""

    k_cache: np.ndarray
    v_cache: np.ndarray
    tables: list  # per row (decode rows, then tiles): its block table
    decode_q: np.ndarray  # [rows, 1, heads, head_dim]
    decode_positions: np.ndarray  # [rows, 1]
    tile_q: np.ndarray  # [tiles, tile, heads, head_dim]
    tile_positions: np.ndarray  # [tiles, tile]


def make_step(shape: Shape, seed: int = 0, tile: int = 64) -> Step:
    rng = np.random.default_rng(seed)
    cache_shape = (NUM_BLOCKS, shape.kv_heads, shape.block_size, shape.head_dim)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    free = list(rng.permutation(NUM_BLOCKS))

    def table(length):
        return [int(free.pop()) for _ in range(-(-length // shape.block_size))]

    heads = shape.kv_heads * shape.groups
    decode_lengths = [1, 15, 33, 70, 130]  # ends inside a block, on an item's edge, past one
    decode_tables = [table(n) for n in decode_lengths] + [[]]  # the last row is padding
    decode_positions = np.array([[n - 1] for n in decode_lengths] + [[-1]], np.int32)
    # Tiles: a whole 40-token prompt; the second chunk (positions 64..127) of a 150-token prompt;
    # a prompt's 21 tokens after a 48-token prefix hit (positions 48..68); a 9-token prompt.
    spans = [(0, 40, 40), (64, 128, 150), (48, 69, 69), (0, 9, 9)]
    tile_tables = [table(total) for _, _, total in spans]
    tile_positions = np.full((len(spans), tile), -1, np.int32)
    for i, (first, end, _) in enumerate(spans):
        tile_positions[i, :end - first] = np.arange(first, end)
    return Step(k_cache, v_cache, decode_tables + tile_tables,
                rng.standard_normal((len(decode_positions), 1, heads, shape.head_dim),
                                    np.float32),
                decode_positions,
                rng.standard_normal((len(spans), tile, heads, shape.head_dim), np.float32),
                tile_positions)


def attend(backend: str, shape: Shape, step: Step) -> tuple[np.ndarray, np.ndarray]:
    """The decode rows' and the tiles' outputs, as model/step.py asks for them: in one call
    (step_attention; `pallas` serves both parts in one kernel call, the others a call each)."""
    chunks = BACKENDS[backend].chunk_sizes(PLATFORM)
    dtype = jnp.dtype(shape.dtype)
    k_cache, v_cache = jnp.asarray(step.k_cache, dtype), jnp.asarray(step.v_cache, dtype)
    rows = len(step.decode_positions)
    decode_items = work_items(step.tables[:rows - 1], step.decode_positions[:rows - 1, 0],
                              shape.block_size, chunks.decode, chunks.decode_items,
                              chunks.work_items_bucket(chunks.decode_items))
    tile_items = work_items(step.tables[rows:], step.tile_positions.max(axis=1),
                            shape.block_size, chunks.prefill, chunks.prefill_items,
                            chunks.work_items_bucket(chunks.prefill_items))
    parts = (AttentionRows(jnp.asarray(step.decode_q, dtype), decode_items,
                           jnp.asarray(step.decode_positions), chunks.decode_items),
             AttentionRows(jnp.asarray(step.tile_q, dtype), tile_items,
                           jnp.asarray(step.tile_positions), chunks.prefill_items))
    decode, tiles = step_attention(backend, k_cache, v_cache, parts)
    return (np.asarray(decode.astype(jnp.float32)), np.asarray(tiles.astype(jnp.float32)))


def numpy_attention(q, keys, values, position):
    """q [heads, dim] against keys/values [n, kv_heads, dim] up to `position`, in float64."""
    groups = q.shape[0] // keys.shape[1]
    k = np.repeat(keys[:position + 1], groups, axis=1).astype(np.float64)
    v = np.repeat(values[:position + 1], groups, axis=1).astype(np.float64)
    scores = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hl,lhd->hd", probs / probs.sum(-1, keepdims=True), v)


def rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(jnp.asarray(array, dtype).astype(jnp.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_is_a_dense_softmax_over_each_rows_own_keys(shape):
    step = make_step(shape)
    decode, tiles = attend("reference", shape, step)
    k_cache, v_cache = rounded(step.k_cache, shape.dtype), rounded(step.v_cache, shape.dtype)
    tolerance = 1e-5 if shape.dtype == "float32" else 2e-2
    rows = len(step.decode_positions)
    outputs = [(decode[r], rounded(step.decode_q[r], shape.dtype), step.decode_positions[r],
                step.tables[r]) for r in range(rows)]
    outputs += [(tiles[t], rounded(step.tile_q[t], shape.dtype), step.tile_positions[t],
                 step.tables[rows + t]) for t in range(len(step.tile_positions))]
    for out, q, positions, table in outputs:
        def row_keys(cache, table=table):
            return cache[table].transpose(0, 2, 1, 3).reshape(-1, shape.kv_heads, shape.head_dim)

        for i, position in enumerate(positions):
            if position < 0:
                np.testing.assert_array_equal(out[i], 0)  # a padding query sees nothing
            else:
                np.testing.assert_allclose(
                    out[i], numpy_attention(q[i], row_keys(k_cache), row_keys(v_cache), position),
                    rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", TESTED)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_every_backend_matches_reference(backend, shape):
    step = make_step(shape, seed=1)
    limit = BACKENDS[backend].unsupported(shape.head_dim, shape.block_size, shape.dtype)
    if limit is not None:  # said where the engine starts, and by the device call
        with pytest.raises(ValueError, match=f"cannot serve .*: {re.escape(limit)}"):
            check_backend(backend, shape.head_dim, shape.block_size, shape.dtype, PLATFORM)
        with pytest.raises((ValueError, TypeError)):
            attend(backend, shape, step)
        return
    expected_decode, expected_tiles = attend("reference", shape, step)
    decode, tiles = attend(backend, shape, step)
    tolerance = 2e-5 if shape.dtype == "float32" else 2e-2
    np.testing.assert_allclose(decode, expected_decode, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(tiles, expected_tiles, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(decode[-1], 0)  # the padding row


def test_the_limits_are_named_where_the_engine_starts():
    cases = [("cpu", 64, 16, "bfloat16", "it reads float32 caches, not bfloat16"),
             ("cpu", 640, 16, "float32", "head_dim 640 is above its 512"),
             ("pallas-interpret", 80, 16, "float32", "head_dim 80 is not a power of two"),
             ("pallas-interpret", 64, 8, "float32", "block_size 8 is not a power of two from 16"),
             ("pallas", 64, 16, "float32", "it runs on gpu, not cpu")]
    for name, head_dim, block_size, dtype, reason in cases:
        if name == "cpu" and not cpu_kernels.available("cpu"):
            continue
        with pytest.raises(ValueError, match=f"attention_backend '{name}' cannot serve "
                                             f"head_dim={head_dim}, block_size={block_size}, "
                                             f"{dtype} caches on cpu: {reason}"):
            check_backend(name, head_dim, block_size, dtype, "cpu")
    with pytest.raises(ValueError, match="attention_backend 'flash' is not one of: auto, "
                                         "reference, xla, cpu, pallas"):
        check_backend("flash", 64, 16, "float32", "cpu")


def test_list_attention_backends_names_what_runs_here_auto_first():
    on_cpu = folojax.list_attention_backends("cpu")
    assert on_cpu == (["cpu", "xla", "reference"] if cpu_kernels.available("cpu")
                      else ["xla", "reference"])
    assert folojax.list_attention_backends("gpu") == ["xla", "reference", "pallas"]
    assert folojax.list_attention_backends() == folojax.list_attention_backends(
        jax.default_backend())


def test_auto_logs_its_choice_and_what_it_passed_over(caplog):
    with caplog.at_level("INFO", logger="folojax.ops.attention_backends"):
        backend = check_backend("auto", 64, 16, "bfloat16", "cpu")
    assert backend.name == "xla"
    assert "attention backend: xla (auto on cpu" in caplog.text
    if cpu_kernels.available("cpu"):
        assert "not cpu: it reads float32 caches, not bfloat16" in caplog.text


@pytest.mark.parametrize("backend", TESTED)
def test_a_step_of_decode_rows_alone_and_single_calls_match_reference(backend):
    """A decode-only step (one part), and each part by a call of its own."""
    shape = SHAPES[0]
    step = make_step(shape, seed=2)
    chunks = BACKENDS[backend].chunk_sizes(PLATFORM)
    k_cache, v_cache = jnp.asarray(step.k_cache), jnp.asarray(step.v_cache)
    rows = len(step.decode_positions)
    items = work_items(step.tables[:rows - 1], step.decode_positions[:rows - 1, 0],
                       shape.block_size, chunks.decode, chunks.decode_items)
    part = AttentionRows(jnp.asarray(step.decode_q), items, jnp.asarray(step.decode_positions),
                         chunks.decode_items)
    [alone] = step_attention(backend, k_cache, v_cache, (part,))
    single = paged_attention(part.q, k_cache, v_cache, items, part.positions,
                             chunks.decode_items, backend)
    expected = paged_attention(part.q, k_cache, v_cache, items, part.positions,
                               chunks.decode_items, "reference")
    np.testing.assert_allclose(alone, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(single, expected, rtol=2e-5, atol=2e-5)
