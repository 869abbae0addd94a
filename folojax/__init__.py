"""folojax: LLM inference the JAX way.

Functional core: load_model, forward, init_cache, prefill, decode_step, generate.
Engine: LLM (vLLM's offline API) and LLMEngine (its step loop), SamplingParams, RequestOutput.

Importing folojax tunes glibc's malloc for XLA's CPU buffers before XLA starts its threads
(folojax/host_malloc.py; FOLOJAX_TUNE_MALLOC=0 turns it off).
"""

from folojax.engine.generate import GenerateResult, generate
from folojax.engine.llm import LLM
from folojax.engine.llm_engine import LLMEngine
from folojax.host_malloc import tune_host_malloc
from folojax.model.decoder import decode_step, forward, num_compiles, prefill
from folojax.ops.kv_cache import KVCache, init_cache
from folojax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folojax.sampling_params import SamplingParams
from folojax.weights.loader import Model, load_model

tune_host_malloc()  # importing folojax starts no XLA threads: this runs before they do

__all__ = [
    "LLM", "LLMEngine", "CompletionOutput", "GenerateResult", "KVCache", "Model", "RequestMetrics",
    "RequestOutput", "SamplingParams", "decode_step", "forward", "generate", "init_cache",
    "load_model", "num_compiles", "prefill",
]
