"""The block pool and the KV cache manager: exact block ids, ref counts, free-queue order, hash
chains, LRU eviction and copy-on-write. Pure Python: no device involved."""

import numpy as np
import pytest

from folojax.engine.block_pool import BlockPool, hash_block_tokens
from folojax.engine.kv_cache_manager import KVCacheManager
from folojax.engine.request import Request
from folojax.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4, n: int = 1) -> Request:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n)
    return Request(request_id, prompt, sampling, np.zeros(2, np.uint32), max_total_len=10_000)


def computed_and_cached(manager: KVCacheManager, request: Request) -> Request:
    """Allocates the request's prompt, marks it computed and offers its blocks to the cache."""
    manager.allocate_slots(request, request.num_tokens)
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request)
    return request


def free_order(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def test_new_blocks_come_from_the_head_and_freed_ones_join_the_tail():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert free_order(pool) == [3, 4]
    pool.free_blocks([blocks[2], blocks[0]])
    assert free_order(pool) == [3, 4, 2, 0]
    assert [b.block_id for b in pool.get_new_blocks(3)] == [3, 4, 2]
    with pytest.raises(ValueError, match="cannot allocate 2 blocks: 1 free"):
        pool.get_new_blocks(2)


def test_touch_takes_an_unheld_block_off_the_free_queue_and_counts_holders():
    pool = BlockPool(3)
    [block] = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_count == 2
    pool.free_blocks([block])
    assert block.ref_count == 1 and free_order(pool) == [1, 2]
    pool.free_blocks([block])
    assert free_order(pool) == [1, 2, 0]
    pool.touch([block])
    assert block.ref_count == 1 and free_order(pool) == [1, 2]
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_block_hashes_chain_over_the_whole_prefix():
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(first, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]),
                                                                 [3, 4])
    # The same tokens after a different prefix are a different block.
    assert hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4]) != hash_block_tokens(
        first, [3, 4])


def test_prefix_hit_reuses_blocks_and_leaves_the_last_token_to_compute():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    first = make_request("a", list(range(10)))
    assert manager.allocate_slots(first, 10) == []
    assert manager.block_ids("a") == [0, 1, 2]
    first.num_computed_tokens = 10
    manager.cache_blocks(first)  # blocks 0 and 1 are full; block 2 holds 2 tokens
    assert [manager.pool.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]

    same_prefix = make_request("b", list(range(8)) + [50, 51, 52])
    blocks, num_cached = manager.get_computed_blocks(same_prefix)
    assert [b.block_id for b in blocks] == [0, 1] and num_cached == 8
    # A prompt of exactly the cached 8 tokens may only reuse 1 block: its last token needs logits.
    exact = make_request("c", list(range(8)))
    blocks, num_cached = manager.get_computed_blocks(exact)
    assert [b.block_id for b in blocks] == [0] and num_cached == 4

    blocks, num_cached = manager.get_computed_blocks(same_prefix)
    assert manager.allocate_slots(same_prefix, 3, blocks) == []
    assert manager.block_ids("b") == [0, 1, 3]
    assert [manager.pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    a, b = make_request("a", [1, 2, 3, 4]), make_request("b", [5, 6, 7, 8])
    for request in (a, b):
        manager.allocate_slots(request, 4)
        request.num_computed_tokens = 4
        manager.cache_blocks(request)
    assert manager.block_ids("a") == [0, 1] and manager.block_ids("b") == [2, 3]
    manager.free(a)  # tail first: block 1 before block 0
    manager.free(b)
    assert free_order(manager.pool) == [1, 0, 3, 2]
    assert len(manager.pool.cached_blocks) == 4

    # Reusing a's prefix takes block 0 back; a new request then evicts 1 (a's tail) first.
    again = make_request("again", [1, 2, 9])
    blocks, num_cached = manager.get_computed_blocks(again)
    assert [blk.block_id for blk in blocks] == [0] and num_cached == 2
    manager.allocate_slots(again, 1, blocks)
    assert manager.block_ids("again") == [0, 1]
    assert manager.pool.blocks[1].block_hash is None  # evicted: its hash is gone
    assert free_order(manager.pool) == [3, 2]
    assert manager.get_computed_blocks(make_request("x", [5, 6, 7, 8, 1]))[1] == 4


def test_allocation_fails_without_changes_when_the_pool_is_short():
    manager = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    manager.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    manager.cache_blocks(a)
    manager.free(a)
    # b would reuse a's first block (unheld, so it leaves the free queue) and need 3 new ones.
    b = make_request("b", [1, 2, 5, 6, 7, 8, 9])
    blocks, num_cached = manager.get_computed_blocks(b)
    assert num_cached == 2
    assert manager.allocate_slots(b, 5, blocks) is None
    assert manager.block_ids("b") == [] and free_order(manager.pool) == [2, 1, 0]
    assert manager.pool.blocks[0].ref_count == 0


def test_forked_children_share_blocks_and_copy_a_shared_block_before_writing_it():
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    parent = make_request("p", list(range(6)), n=3)
    manager.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    assert manager.block_ids("p") == [0, 1]
    children = [make_request(f"p#{i}", list(range(6))) for i in (1, 2)]
    for child in children:
        manager.fork(parent, child, 5)
        child.num_computed_tokens = 5
    assert [manager.pool.blocks[i].ref_count for i in (0, 1)] == [3, 3]
    # Child 1 recomputes position 5, in shared block 1: it gets a copy (block 2) first.
    assert manager.allocate_slots(children[0], 1) == [(1, 2)]
    assert manager.block_ids("p#1") == [0, 2]
    assert [manager.pool.blocks[i].ref_count for i in (0, 1, 2)] == [3, 2, 1]
    # The parent writes position 6 into block 1, still shared with child 2: copied too.
    assert manager.allocate_slots(parent, 1) == [(1, 3)]
    # Child 2 is now block 1's only holder and writes it in place.
    assert manager.allocate_slots(children[1], 1) == []
    assert manager.block_ids("p#2") == [0, 1]
    manager.free(parent)
    assert manager.pool.blocks[0].ref_count == 2 and manager.pool.blocks[3].ref_count == 0


def test_reset_prefix_cache_forgets_every_hash():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    computed_and_cached(manager, make_request("a", [1, 2, 3, 4, 5]))
    assert manager.get_computed_blocks(make_request("b", [1, 2, 3, 4, 9]))[1] == 4
    manager.pool.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", [1, 2, 3, 4, 9])) == ([], 0)
    assert all(block.block_hash is None for block in manager.pool.blocks)


def test_block_hashes_are_sha256_chains_of_the_token_bytes():
    import hashlib

    first = hashlib.sha256(b"" + np.asarray([1, 2], np.int64).tobytes()).digest()
    assert hash_block_tokens(None, [1, 2]) == first
    assert hash_block_tokens(first, [3, 4]) == hashlib.sha256(
        first + np.asarray([3, 4], np.int64).tobytes()).digest()


def test_a_forced_block_hash_collision_reuses_no_block(monkeypatch):
    # Every block hashes alike: only the stored tokens and chain links can tell them apart.
    monkeypatch.setattr("folojax.engine.kv_cache_manager.hash_block_tokens",
                        lambda parent, tokens: b"collision")
    manager = KVCacheManager(num_blocks=8, block_size=2)
    computed_and_cached(manager, make_request("victim", [1, 2, 3, 4, 5]))
    assert len(manager.pool.cached_blocks) == 1  # the first block with the hash keeps it
    for prompt in ([7, 8, 3, 4, 5], [3, 4, 1, 2, 5], [7, 1, 2, 9]):
        assert manager.get_computed_blocks(make_request("attacker", prompt)) == ([], 0)
    # The victim's own prefix still hits.
    blocks, num_cached = manager.get_computed_blocks(make_request("again", [1, 2, 3, 4, 6]))
    assert [b.block_id for b in blocks] == [0] and num_cached == 2


def test_a_hit_needs_the_exact_block_it_was_cached_after():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    manager.free(computed_and_cached(manager, make_request("a", [1, 2, 3, 4, 5])))
    block_0, block_1 = manager.pool.blocks[0], manager.pool.blocks[1]
    # Evict block 0 and cache other tokens in it: block 1 no longer follows it.
    manager.pool._evict(block_0)
    manager.pool.cache_block(block_0, hash_block_tokens(None, [1, 2]), [1, 2], None)
    assert manager.pool.get_cached_block(block_1.block_hash, [3, 4], block_0) is None
