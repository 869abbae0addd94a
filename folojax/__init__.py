"""folojax: LLM inference the JAX way.

Functional core: load_model, forward, init_cache, prefill, decode_step, generate.
Engine: LLM (vLLM's offline API) and LLMEngine (its step loop), SamplingParams, RequestOutput.

Importing folojax changes no process-wide setting unless asked: FOLOJAX_TUNE_MALLOC=1 tunes
glibc's malloc for XLA's CPU buffers (folojax/host_malloc.py; the `folojax` command does it by
default). JAX's persistent compilation cache is turned on in folojax's cache directory unless the
program chose one (folojax/compilation_cache.py).
"""

import importlib.metadata

from folojax.compilation_cache import enable_compilation_cache
from folojax.engine.generate import GenerateResult, decode_step, generate, prefill
from folojax.engine.llm import LLM
from folojax.engine.llm_engine import LLMEngine
from folojax.host_malloc import tune_host_malloc, tune_if_opted_in
from folojax.model.decoder import forward, num_compiles
from folojax.ops.attention_backends import list_attention_backends
from folojax.ops.paged_kv_cache import PagedKVCache, init_cache
from folojax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folojax.sampling_params import SamplingParams
from folojax.weights.loader import Model, load_model

__version__ = importlib.metadata.version("folojax")

tune_if_opted_in()  # importing folojax starts no XLA threads: this runs before they do
enable_compilation_cache()

__all__ = [
    "LLM", "LLMEngine", "CompletionOutput", "GenerateResult", "Model", "PagedKVCache",
    "RequestMetrics", "RequestOutput", "SamplingParams", "decode_step", "forward", "generate",
    "init_cache", "list_attention_backends", "load_model", "num_compiles", "prefill",
    "tune_host_malloc",
]
