"""The paged KV cache: per layer, one pool of slots shared by all requests.

Slot `block_id * block_size + offset` holds one token's keys (or values) for every KV head. Which
blocks belong to which request is host-side bookkeeping (engine/kv_cache_manager.py); the device
only sees slot numbers: where to write this step's keys (`slot_mapping`) and where to read each
request's keys from. As in ops/kv_cache.py, each layer has its own buffers so that a donated step
scatters into them in place.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from folojax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    k: list[jax.Array]  # per layer: [num_slots, num_kv_heads, head_dim]
    v: list[jax.Array]  # per layer: [num_slots, num_kv_heads, head_dim]

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]


def init_paged_cache(config: ModelConfig, num_blocks: int, block_size: int,
                     dtype=jnp.float32) -> PagedKVCache:
    shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
    return PagedKVCache(k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                        v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)])


def cache_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes of keys and values one token takes in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def write_slots(cache: PagedKVCache, layer: int, k: jax.Array, v: jax.Array,
                slot_mapping: jax.Array) -> PagedKVCache:
    """Writes k, v [tokens, kv_heads, head_dim] at `slot_mapping` [tokens]; slots out of range
    (padding tokens) are dropped."""
    new_k, new_v = list(cache.k), list(cache.v)
    new_k[layer] = cache.k[layer].at[slot_mapping].set(k.astype(cache.k[layer].dtype), mode="drop")
    new_v[layer] = cache.v[layer].at[slot_mapping].set(v.astype(cache.v[layer].dtype), mode="drop")
    return PagedKVCache(new_k, new_v)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_slots(cache: PagedKVCache, source_slots: jax.Array,
               destination_slots: jax.Array) -> PagedKVCache:
    """Copies every layer's slots (copy-on-write of shared blocks); out-of-range destinations
    (padding) are dropped."""
    def copy(layer):
        return layer.at[destination_slots].set(layer[source_slots], mode="drop")

    return PagedKVCache([copy(k) for k in cache.k], [copy(v) for v in cache.v])
