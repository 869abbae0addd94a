"""Per-request block tables over the block pool: prefix lookup, slot allocation, forks, freeing.

A request's block table lists the blocks holding its tokens in order: position p lives in block
table[p // block_size] at offset p % block_size. Blocks can be shared (prefix-cache hits, forked
children); a shared block that is about to be written is first copied (copy-on-write), and the
copy is returned to the caller, which performs it on the device before the step writes.
"""

from __future__ import annotations

from folojax.engine.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from folojax.engine.request import Request

BlockCopy = tuple[int, int]  # (source block id, destination block id)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.block_tables: dict[str, list[KVBlock]] = {}
        self._num_hashed_blocks: dict[str, int] = {}  # leading blocks already offered to the cache
        self._chains: dict[str, list[KVBlock]] = {}  # the cached blocks of each one's prefix

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.block_tables.get(request_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached blocks matching the request's tokens, and how many tokens
        they hold. At least one token is always left to compute: its logits are needed. A request
        that asks for prompt logprobs computes its whole prompt (each token's logits are needed)."""
        if (not self.enable_prefix_caching or request.num_computed_tokens > 0
                or request.sampling.prompt_logprobs is not None):
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for index, block_hash in enumerate(self._block_hashes(request)[:max_blocks]):
            block = self.pool.get_cached_block(block_hash, self._block_tokens(request, index),
                                               blocks[-1] if blocks else None)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[BlockCopy] | None:
        """Makes room for the request's next `num_new_tokens` tokens (after its computed ones and
        any `computed_blocks` from get_computed_blocks). Returns the block copies to perform
        first, or None, changing nothing, if the pool has too few free blocks."""
        computed_blocks = computed_blocks or []
        table = self.block_tables.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_required = cdiv(num_total, self.block_size) - len(table) - len(computed_blocks)
        written = range(num_computed // self.block_size,
                        min(cdiv(num_total, self.block_size), len(table)))
        shared = [index for index in written if table[index].ref_count > 1]
        # Taking a cached block that nobody holds removes it from the free queue.
        num_unheld_hits = sum(1 for block in computed_blocks if block.ref_count == 0)
        if max(num_required, 0) + len(shared) > self.pool.num_free_blocks - num_unheld_hits:
            if not table:
                del self.block_tables[request.request_id]
            return None
        self.pool.touch(computed_blocks)
        table.extend(computed_blocks)
        copies = []
        for index in shared:
            [copy] = self.pool.get_new_blocks(1)
            copies.append((table[index].block_id, copy.block_id))
            self.pool.free_blocks([table[index]])
            table[index] = copy
        if num_required > 0:
            table.extend(self.pool.get_new_blocks(num_required))
        return copies

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """The child shares the parent's blocks holding its first `num_tokens` tokens."""
        shared = self.block_tables[parent.request_id][:cdiv(num_tokens, self.block_size)]
        self.pool.touch(shared)
        self.block_tables[child.request_id] = list(shared)

    def cache_blocks(self, request: Request) -> None:
        """Offers the request's full, computed blocks to the prefix cache (those whose tokens are
        all known: a block holding a token still in flight waits).

        Each block is cached after the cached block of its chain's previous index (the one a
        lookup of these tokens finds, which may be another request's), so that a later hit can
        check the link; a chain whose lookup fails (a hash collision) is cached no further."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(request.request_id, [])
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.block_size, len(table))
        start = self._num_hashed_blocks.get(request.request_id, 0)
        chain = self._chains.setdefault(request.request_id, [])
        hashes = self._block_hashes(request)
        for index in range(start, num_full):
            if len(chain) < index:
                break  # the chain broke at an earlier block
            parent = chain[index - 1] if index else None
            tokens = self._block_tokens(request, index)
            self.pool.cache_block(table[index], hashes[index], tokens, parent)
            cached = self.pool.get_cached_block(hashes[index], tokens, parent)
            if cached is None:
                break
            chain.append(cached)
        self._num_hashed_blocks[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last first: its tail is evicted before its prefix."""
        table = self.block_tables.pop(request.request_id, [])
        self._num_hashed_blocks.pop(request.request_id, None)
        self._chains.pop(request.request_id, None)
        self.pool.free_blocks(list(reversed(table)))

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        return request.all_token_ids[index * self.block_size:(index + 1) * self.block_size]

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended as its tokens grow."""
        hashes = request.block_hashes
        while (len(hashes) + 1) * self.block_size <= request.num_tokens:
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None,
                                            self._block_tokens(request, len(hashes))))
        return hashes
