"""folojax: LLM inference the JAX way."""
from folojax.model.decoder import decode_step, forward, num_compiles, prefill
from folojax.ops.kv_cache import KVCache, init_cache
from folojax.weights.loader import Model, load_model
from folojax.engine.generate import GenerateResult, generate
from folojax.sampling_params import SamplingParams
from folojax.engine.llm import LLM
from folojax.outputs import CompletionOutput, RequestMetrics, RequestOutput
