"""Paged attention against a dense softmax over each row's own keys, read from its blocks."""

import jax.numpy as jnp
import numpy as np
import pytest

from folojax.engine.step_inputs import work_items
from folojax.ops.paged_attention import ChunkSizes, paged_attention
from folojax.ops.paged_kv_cache import PagedKVCache, copy_blocks, write_slots

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, NUM_BLOCKS = 2, 3, 8, 4, 256
CPU, GPU = ChunkSizes(64, 16, 64, 16), ChunkSizes(512, 256, 512, 128)


def reference(q, keys, values, length):
    """q [heads, dim] attending to keys/values [length, kv_heads, dim]."""
    k = np.repeat(keys[:length], GROUPS, axis=1)  # [length, heads, dim]
    v = np.repeat(values[:length], GROUPS, axis=1)
    scores = np.einsum("hd,lhd->hl", q, k) / np.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hl,lhd->hd", probs / probs.sum(-1, keepdims=True), v)


def random_pool(rng, lengths):
    """A cache pool and one shuffled block table per row; also each row's keys in order."""
    k_cache = rng.standard_normal((NUM_BLOCKS, KV_HEADS, BLOCK, HEAD_DIM)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    free = list(rng.permutation(NUM_BLOCKS))
    tables = [[int(free.pop()) for _ in range(-(-n // BLOCK))] for n in lengths]

    def row_keys(cache, table):
        return cache[table].transpose(0, 2, 1, 3).reshape(-1, KV_HEADS, HEAD_DIM)

    return k_cache, v_cache, tables, row_keys


@pytest.mark.parametrize("chunks", [CPU, GPU], ids=["cpu-chunks", "gpu-chunks"])
def test_decode_rows_of_different_lengths_attend_to_their_own_keys(chunks):
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
        jnp.asarray(positions[:, None]), chunks.decode_items))[:, 0]
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        expected = reference(q[row], row_keys(k_cache, table), row_keys(v_cache, table), n)
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[-1], 0)  # the padding row sees nothing


@pytest.mark.parametrize(("chunk", "items_per_iteration"), [(16, 1), (64, 16), (512, 128)])
def test_prefill_tiles_are_causal_over_their_request_blocks(chunk, items_per_iteration):
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
        jnp.asarray(positions), items_per_iteration))
    for row, table in enumerate(tables):
        for i, position in enumerate(positions[row]):
            if position < 0:
                np.testing.assert_array_equal(out[row, i], 0)
                continue
            expected = reference(q[row, i], row_keys(k_cache, table), row_keys(v_cache, table),
                                 position + 1)
            np.testing.assert_allclose(out[row, i], expected, rtol=1e-5, atol=1e-5)


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
