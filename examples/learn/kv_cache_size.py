"""What the KV cache of a model costs and saves, from its config.json alone (no weights).

    python examples/learn/kv_cache_size.py --config configs/qwen3-0.6b.json --tokens 32768

Prints the bytes one token's keys and values take in every layer (folojax's own
`cache_bytes_per_token`), the cache of `--tokens` tokens, the blocks it fills, and the
multiply-adds of decoding token `--tokens` with the cache against recomputing the whole prefix
without one. docs/learn/m1-offline-inference.md walks through the arithmetic.
"""

import argparse

import jax.numpy as jnp

from folojax.config import ModelConfig
from folojax.engine.kv_cache_manager import cdiv
from folojax.ops.paged_kv_cache import cache_bytes_per_token


def linear_weights_per_token(config: ModelConfig) -> int:
    """Multiply-adds of the linear layers for one token (q/k/v, o, gate/up, down; the head)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return config.num_layers * per_layer + config.vocab_size * hidden


def attention_per_token(config: ModelConfig, context: int) -> int:
    """Multiply-adds of one query token's attention over `context` keys (scores and values)."""
    return 2 * config.num_layers * config.num_heads * config.head_dim * context


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a Hugging Face config.json")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens held in the cache")
    parser.add_argument("--dtype", default="bfloat16", help="the cache's dtype")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    args = parser.parse_args(argv)

    config = ModelConfig.from_json_file(args.config)
    per_token = cache_bytes_per_token(config, jnp.dtype(args.dtype))
    print(f"{args.config}: {config.num_layers} layers x {config.num_kv_heads} KV heads x "
          f"head_dim {config.head_dim}, {args.dtype}")
    print(f"KV cache per token: 2 (K and V) x {config.num_layers} x {config.num_kv_heads} x "
          f"{config.head_dim} x {jnp.dtype(args.dtype).itemsize} bytes = {per_token} bytes "
          f"({per_token / 2**10:.1f} KiB)")
    total = per_token * args.tokens
    print(f"{args.tokens} tokens: {total / 2**30:.3f} GiB in "
          f"{cdiv(args.tokens, args.block_size)} blocks of {args.block_size} tokens")
    with_cache = linear_weights_per_token(config) + attention_per_token(config, args.tokens)
    # Without a cache, every token of the prefix runs again; token t attends to t + 1 keys.
    without = (args.tokens * linear_weights_per_token(config)
               + attention_per_token(config, 1) * args.tokens * (args.tokens + 1) // 2)
    print(f"token {args.tokens}'s multiply-adds: {with_cache / 1e9:.2f} G with the cache, about "
          f"{without / 1e12:.1f} T recomputing the prefix without it (x{without / with_cache:.0f})")


if __name__ == "__main__":
    main()
