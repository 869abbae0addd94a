"""Paged attention against a dense softmax over each row's own keys, read from its blocks: the
dense oracle (backend "reference"), the gather loop ("xla") and the C++ kernel ("cpu", where it
builds). tests/test_attention_backends.py covers every backend over model shapes."""

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from folojax.ops import cpu_kernels
from folojax.ops.attention_backends import check_backend, paged_attention
from folojax.ops.paged_attention import ChunkSizes
from folojax.ops.paged_kv_cache import PagedKVCache, copy_blocks, write_slots
from folojax.runner.prepare import work_items

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, NUM_BLOCKS = 2, 3, 8, 4, 256
CPU, GPU = ChunkSizes(64, 16, 64, 16), ChunkSizes(512, 256, 512, 128)
needs_native = pytest.mark.skipif(not cpu_kernels.available("cpu"),
                                  reason="the C++ kernel does not build here (no compiler?)")
KERNELS = ["reference", "xla", pytest.param("cpu", marks=needs_native)]


def reference(q, keys, values, length):
    """q [heads, dim] attending to keys/values [length, kv_heads, dim]."""
    groups = q.shape[0] // keys.shape[1]
    k = np.repeat(keys[:length], groups, axis=1)  # [length, heads, dim]
    v = np.repeat(values[:length], groups, axis=1)
    scores = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hl,lhd->hd", probs / probs.sum(-1, keepdims=True), v)


def random_pool(rng, lengths, kv_heads=KV_HEADS, block=BLOCK, head_dim=HEAD_DIM):
    """A cache pool and one shuffled block table per row; also each row's keys in order."""
    k_cache = rng.standard_normal((NUM_BLOCKS, kv_heads, block, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    free = list(rng.permutation(NUM_BLOCKS))
    tables = [[int(free.pop()) for _ in range(-(-n // block))] for n in lengths]

    def row_keys(cache, table):
        return cache[table].transpose(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)

    return k_cache, v_cache, tables, row_keys


def assert_rows_match_reference(out, q, positions, tables, k_cache, v_cache, row_keys):
    """Each query of each row against a dense softmax over its own keys; padding queries: 0."""
    for row, table in enumerate(tables):
        for i, position in enumerate(positions[row]):
            if position < 0:
                np.testing.assert_array_equal(out[row, i], 0)
                continue
            expected = reference(q[row, i], row_keys(k_cache, table), row_keys(v_cache, table),
                                 position + 1)
            np.testing.assert_allclose(out[row, i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", [CPU, GPU], ids=["cpu-chunks", "gpu-chunks"])
def test_decode_rows_of_different_lengths_attend_to_their_own_keys(chunks, kernel):
    rng = np.random.default_rng(0)
    lengths = [1, 5, 64, 65, 130, 37, 200]  # some end inside an item, some on its edge
    k_cache, v_cache, tables, row_keys = random_pool(rng, lengths)
    rows = len(lengths) + 1  # one padding row (position -1)
    q = rng.standard_normal((rows, KV_HEADS * GROUPS, HEAD_DIM)).astype(np.float32)
    positions = np.array([n - 1 for n in lengths] + [-1], np.int32)
    items = work_items(tables, positions[:len(lengths)], BLOCK, chunks.decode,
                       chunks.decode_items)
    assert items.rows.shape[0] % chunks.decode_items == 0
    out = np.asarray(paged_attention(
        jnp.asarray(q[:, None]), jnp.asarray(k_cache), jnp.asarray(v_cache), items,
        jnp.asarray(positions[:, None]), chunks.decode_items, kernel))[:, 0]
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        expected = reference(q[row], row_keys(k_cache, table), row_keys(v_cache, table), n)
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[-1], 0)  # the padding row sees nothing


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("chunk", "items_per_iteration"), [(16, 1), (64, 16), (512, 128)])
def test_prefill_tiles_are_causal_over_their_request_blocks(chunk, items_per_iteration, kernel):
    rng = np.random.default_rng(1)
    lengths, q_len = [70, 30, 100], 8
    k_cache, v_cache, tables, row_keys = random_pool(rng, lengths)
    # Tile 0: the last q_len positions of request 0; tile 1 the same of request 1, ending in
    # padding queries; tile 2: the first q_len positions of request 2 (a chunk it needs alone).
    positions = np.array([np.arange(70 - q_len, 70), np.arange(30 - q_len, 30),
                          np.arange(q_len)], np.int32)
    positions[1, -2:] = -1
    q = rng.standard_normal((len(lengths), q_len, KV_HEADS * GROUPS, HEAD_DIM)).astype(np.float32)
    items = work_items(tables, positions.max(axis=1), BLOCK, chunk, items_per_iteration)
    keys_per_item = max(1, chunk // BLOCK) * BLOCK
    assert int(items.num_iterations) * items_per_iteration >= sum(
        -(-(p + 1) // keys_per_item) for p in positions.max(axis=1))
    out = np.asarray(paged_attention(
        jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), items,
        jnp.asarray(positions), items_per_iteration, kernel))
    assert_rows_match_reference(out, q, positions, tables, k_cache, v_cache, row_keys)


@needs_native
@pytest.mark.parametrize(("head_dim", "block"), [(64, 16), (128, 16), (64, 8), (40, 16)])
def test_cpu_kernel_matches_a_dense_softmax_at_model_shapes(head_dim, block):
    """The kernel's specialized shapes (head_dim 64 and 128 with 16-token blocks) and others:
    7-query tiles of 2 query heads per KV head (14 queries: register tiles of 4 plus a rest),
    padding queries in the middle of a tile, a row whose keys start at a later block only
    through its last query, and a padding row without items."""
    rng = np.random.default_rng(4)
    kv_heads, groups, q_len = 2, 2, 7
    lengths = [5, 16, 17, 100, 250]
    k_cache, v_cache, tables, row_keys = random_pool(rng, lengths, kv_heads, block, head_dim)
    positions = np.full((len(lengths) + 1, q_len), -1, np.int32)
    for row, n in enumerate(lengths):
        count = min(q_len, n)
        positions[row, :count] = np.arange(n - count, n)
    positions[3, 2:4] = -1  # padding in the middle of a tile
    q = rng.standard_normal((len(positions), q_len, kv_heads * groups, head_dim))
    q = q.astype(np.float32)
    items = work_items(tables, positions[:len(lengths)].max(axis=1), block, 64, 16)
    out = np.asarray(paged_attention(
        jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), items,
        jnp.asarray(positions), 16, "cpu"))
    assert_rows_match_reference(out, q, positions, tables, k_cache, v_cache, row_keys)
    np.testing.assert_array_equal(out[-1], 0)


@needs_native
def test_auto_serves_cpu_by_the_kernel_for_float32_caches_only():
    assert check_backend("auto", 64, 16, jnp.float32, "cpu").name == "cpu"
    assert check_backend("auto", 64, 16, jnp.bfloat16, "cpu").name == "xla"
    assert check_backend("auto", 64, 16, jnp.bfloat16, "gpu").name == "xla"


@pytest.mark.parametrize("environment", [{"FOLOJAX_NATIVE_KERNELS": "0"}, {"CXX": "false"},
                                         {"CXX": "/no/such/compiler"}])
def test_without_the_kernel_auto_takes_xla_and_cpu_by_name_says_why(environment, monkeypatch,
                                                                     tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_state", {})  # forget the outcome of this process's load
    monkeypatch.setenv("FOLOJAX_CACHE_DIR", str(tmp_path))  # no cached build to find
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="folojax.ops.cpu_kernels"):
        assert check_backend("auto", HEAD_DIM, BLOCK, jnp.float32, "cpu").name == "xla"
    if "CXX" in environment:
        assert "native CPU kernels unavailable, using the JAX path" in caplog.text
        assert environment["CXX"] in caplog.text
    cache = jnp.zeros((4, 1, BLOCK, HEAD_DIM))
    items = work_items([[0]], np.array([0]), BLOCK, BLOCK, 1)
    with pytest.raises(ValueError, match="attention_backend 'cpu' cannot serve .* the C.. "
                                         "kernels did not build here"):
        check_backend("cpu", HEAD_DIM, BLOCK, jnp.float32, "cpu")
    with pytest.raises(RuntimeError, match="paged-attention kernel is not available"):
        paged_attention(jnp.zeros((1, 1, 1, HEAD_DIM)), cache, cache, items,
                        jnp.zeros((1, 1), jnp.int32), 1, "cpu")


def test_write_slots_and_copy_blocks_address_whole_blocks():
    shape = (6, KV_HEADS, BLOCK, HEAD_DIM)  # [num_blocks, kv_heads, block_size, head_dim]
    cache = PagedKVCache(k=[jnp.zeros(shape) for _ in range(2)],  # 2 layers
                         v=[jnp.zeros(shape) for _ in range(2)])
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    slots = np.array([2 * BLOCK + 1, 5 * BLOCK + BLOCK - 1, cache.num_slots], np.int32)  # + padding
    cache = write_slots(cache, 1, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    expected_k, expected_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    expected_k[2, :, 1], expected_k[5, :, BLOCK - 1] = k[0], k[1]
    expected_v[2, :, 1], expected_v[5, :, BLOCK - 1] = v[0], v[1]
    np.testing.assert_array_equal(cache.k[1], expected_k)  # the padding token was dropped
    np.testing.assert_array_equal(cache.v[1], expected_v)
    np.testing.assert_array_equal(cache.k[0], 0)  # other layers untouched
    # Block 2 -> 0, and a padding copy (destination out of range) that changes nothing.
    cache = copy_blocks(cache, jnp.array([2, 2], jnp.int32), jnp.array([0, 6], jnp.int32))
    expected_k[0], expected_v[0] = expected_k[2], expected_v[2]
    np.testing.assert_array_equal(cache.k[1], expected_k)
    np.testing.assert_array_equal(cache.v[1], expected_v)


def test_a_load_started_in_the_background_is_waited_for_and_done_once(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    builds = []

    def slow_build() -> bool:
        time.sleep(0.3)
        builds.append(threading.current_thread().name)
        return True

    monkeypatch.setattr(cpu_kernels, "_build_and_register", slow_build)
    cpu_kernels.start_loading()
    assert cpu_kernels.load() is True  # waits for the build in flight rather than starting one
    assert len(builds) == 1
    cpu_kernels.start_loading()  # loaded already: no second build
    assert cpu_kernels.load() is True and len(builds) == 1
