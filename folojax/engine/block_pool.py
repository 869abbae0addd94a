"""The pool of fixed-size KV-cache blocks: ref counts, an LRU free queue, and the prefix-cache map.

Host-only bookkeeping over block ids; the device cache holds the blocks' keys and values. A block
whose ref count drops to 0 goes to the tail of the free queue but keeps its hash, so a later
request with the same prefix can take it back; new blocks are taken from the head (least recently
freed), and only then does a cached block lose its hash.

A prefix hit must never serve one request another's keys and values (vLLM's CVE-2025-25183 was
a collision of Python's unkeyed 64-bit `hash`): block hashes are sha256 chains, and a hit is
also checked against the block's stored tokens and the exact block it was cached after.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained sha256 of one full block: the parent's digest, then the tokens as int64 bytes."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    return digest.digest()


@dataclasses.dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    # What a hit is checked against: the block's tokens, and the (block id, cache_version) of
    # the block cached right before it in its chain (None for a first block).
    token_ids: tuple[int, ...] = ()
    parent: tuple[int, int] | None = None
    cache_version: int = 0  # bumped each time the block is cached anew


class BlockPool:
    """Owns every block: allocation, freeing, and the hash -> block map of cached full blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        # block_id -> block, in eviction order (head = least recently freed).
        self.free_queue: collections.OrderedDict[int, KVBlock] = collections.OrderedDict(
            (block.block_id, block) for block in self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones among them can still be reused or evicted)."""
        return len(self.free_queue)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Takes blocks from the head of the free queue, evicting their cached hashes."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks: {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Adds a holder to each block (taking it off the free queue if nobody held it)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free_blocks(self, blocks: Sequence[KVBlock]) -> None:
        """Drops one holder from each block, in the order given; unheld blocks join the tail."""
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def get_cached_block(self, block_hash: BlockHash, token_ids: Sequence[int],
                         parent: KVBlock | None) -> KVBlock | None:
        """The cached block under `block_hash` if it holds exactly `token_ids` and was cached
        right after `parent` (the previous hit of the same chain); else None."""
        block = self.cached_blocks.get(block_hash) if self.enable_caching else None
        if block is None or block.token_ids != tuple(token_ids) or block.parent != _link(parent):
            return None
        return block

    def cache_block(self, block: KVBlock, block_hash: BlockHash, token_ids: Sequence[int],
                    parent: KVBlock | None) -> None:
        """Records a full, computed block under its hash (the first block with a hash keeps it)
        with its tokens and the block before it in the request's table."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            block.token_ids = tuple(token_ids)
            block.parent = _link(parent)
            block.cache_version += 1
            self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (blocks in use keep their contents)."""
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
            block.token_ids, block.parent = (), None


def _link(block: KVBlock | None) -> tuple[int, int] | None:
    """Identifies a block as cached now: a later re-caching of the same id is another link."""
    return None if block is None else (block.block_id, block.cache_version)
