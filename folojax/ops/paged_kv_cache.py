"""The paged KV cache: per layer, one pool of fixed-size blocks shared by all requests.

Each layer's keys (and values) are one array [num_blocks, kv_heads, block_size, head_dim]: block b
is one contiguous [kv_heads, block_size, head_dim] slab, so attention reads each of a row's
blocks in one piece (faster than heads-first [kv_heads, num_blocks, ...]: docs/BENCHMARKS.md).
Token slot `b * block_size + offset` is offset `offset` of block b. Which blocks belong to which
request is host-side bookkeeping (engine/kv_cache_manager.py); the device sees block tables and
slot numbers. Each layer has its own buffers, so that a donated step updates them in place (a
scatter into one stacked [layers, ...] buffer copies all of it).

The functional API (folojax.generate, prefill, decode_step) uses the same cache with fixed rows:
`init_cache` gives row b its own run of blocks, and the cache carries those block tables and each
row's length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import CacheConfig, ModelConfig

ROW_BLOCK_SIZE = 16  # tokens per block of init_cache's rows


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "block_tables",
                                                                  "lengths"],
                   meta_fields=["max_seq_len"])
@dataclasses.dataclass
class PagedKVCache:
    k: list[jax.Array]  # per layer: [num_blocks, num_kv_heads, block_size, head_dim]
    v: list[jax.Array]  # per layer: [num_blocks, num_kv_heads, block_size, head_dim]
    # Fixed rows (init_cache) only; None in the engine's pool, whose tables live on the host.
    block_tables: jax.Array | None = None  # [rows, blocks per row] int32
    lengths: jax.Array | None = None  # [rows] int32: tokens each row holds
    max_seq_len: int | None = None  # tokens a row may hold

    @property
    def batch_size(self) -> int:
        if self.block_tables is None:
            raise ValueError("this cache is an engine's block pool: it has no rows")
        return self.block_tables.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def init_paged_cache(config: ModelConfig, num_blocks: int, block_size: int,
                     dtype=jnp.float32) -> PagedKVCache:
    shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)
    return PagedKVCache(k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                        v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)])


def init_cache(config: ModelConfig, batch_size: int, max_seq_len: int,
               dtype=jnp.float32) -> PagedKVCache:
    """An empty cache of `batch_size` rows of up to `max_seq_len` tokens each: row b owns blocks
    [b * blocks per row, (b + 1) * blocks per row)."""
    CacheConfig(max_seq_len=max_seq_len, batch_size=batch_size)  # validates both
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    blocks_per_row = -(-max_seq_len // ROW_BLOCK_SIZE)
    cache = init_paged_cache(config, batch_size * blocks_per_row, ROW_BLOCK_SIZE, dtype)
    tables = np.arange(batch_size * blocks_per_row, dtype=np.int32).reshape(batch_size, -1)
    return dataclasses.replace(cache, block_tables=jnp.asarray(tables),
                               lengths=jnp.zeros((batch_size,), jnp.int32),
                               max_seq_len=max_seq_len)


def cache_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes of keys and values one token takes in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def write_slots(cache: PagedKVCache, layer: int, k: jax.Array, v: jax.Array,
                slot_mapping: jax.Array) -> PagedKVCache:
    """Writes k, v [tokens, kv_heads, head_dim] at `slot_mapping` [tokens]; slots out of range
    (padding tokens) are dropped."""
    blocks, offsets = slot_mapping // cache.block_size, slot_mapping % cache.block_size
    new_k, new_v = list(cache.k), list(cache.v)
    # Index arrays split by a slice go first: the update is [tokens, kv_heads, head_dim].
    new_k[layer] = cache.k[layer].at[blocks, :, offsets].set(
        k.astype(cache.k[layer].dtype), mode="drop")
    new_v[layer] = cache.v[layer].at[blocks, :, offsets].set(
        v.astype(cache.v[layer].dtype), mode="drop")
    return dataclasses.replace(cache, k=new_k, v=new_v)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_blocks(cache: PagedKVCache, source_blocks: jax.Array,
                destination_blocks: jax.Array) -> PagedKVCache:
    """Copies whole blocks in every layer (copy-on-write of shared blocks); out-of-range
    destinations (padding) are dropped."""
    def copy(layer):
        return layer.at[destination_blocks].set(layer[source_blocks], mode="drop")

    return dataclasses.replace(cache, k=[copy(k) for k in cache.k], v=[copy(v) for v in cache.v])
