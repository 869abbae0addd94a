"""Block bookkeeping for the functional API's fixed rows: each request owns one cache row (a
fixed run of blocks, from init_cache) and continues after the tokens the row already holds.

It answers the scheduler as KVCacheManager does, so folojax.generate runs the engine's own
scheduler and step; nothing is shared, cached or preempted (a row never runs out: requests are
sized to their row when they are made).
"""

from __future__ import annotations

import numpy as np

from folojax.engine.request import Request


class RowKVCacheManager:
    def __init__(self, block_tables: np.ndarray, block_size: int):
        self.block_size = block_size
        self.block_tables = block_tables  # [rows, blocks per row]
        self.rows: dict[str, int] = {}  # request id -> its row

    def assign(self, request: Request, row: int) -> None:
        self.rows[request.request_id] = row

    def block_ids(self, request_id: str) -> list[int]:
        return self.block_tables[self.rows[request_id]].tolist()

    def get_computed_blocks(self, request: Request) -> tuple[list, int]:
        """Nothing to share; the tokens the row already held count as computed."""
        return [], request.num_prefix_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list | None = None) -> list:
        capacity = self.block_tables.shape[1] * self.block_size
        if request.num_computed_tokens + num_new_tokens > capacity:
            raise ValueError(f"request {request.request_id} outgrows its cache row of "
                             f"{capacity} tokens")
        return []

    def cache_blocks(self, request: Request) -> None:
        pass

    def free(self, request: Request) -> None:
        pass  # the row keeps its keys and values for the caller's next generate

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        raise ValueError("folojax.generate makes one completion per row (SamplingParams.n=1)")
