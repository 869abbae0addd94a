"""folojax: LLM inference the JAX way."""
from folojax.model.decoder import decode_step, forward, num_compiles, prefill
from folojax.ops.kv_cache import KVCache, init_cache
from folojax.weights.loader import Model, load_model
