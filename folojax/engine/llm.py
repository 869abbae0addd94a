"""folojax.LLM: vLLM's offline API (generate, chat) over the LLMEngine's step loop.

Requests are validated and tokenized first, so bad input raises before any device work and the
LLM stays usable. Then all of them are queued and the engine steps until every one is finished:
continuous batching over the paged KV cache, with chunked prefill and prefix caching.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
from tqdm.auto import tqdm

from folojax.config import EngineConfig, KVCacheConfig, ModelConfig, SchedulerConfig
from folojax.engine.kv_cache_manager import cdiv
from folojax.engine.llm_engine import LLMEngine
from folojax.engine.validation import validate_seed
from folojax.ops.attention_backends import check_backend_name
from folojax.ops.paged_kv_cache import cache_bytes_per_token
from folojax.outputs import RequestOutput
from folojax.sampling_params import SamplingParams
from folojax.tokenizer import apply_chat_template
from folojax.weights.loader import Model, load_model
from folojax.weights.quantized import check_quantization

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20
DEFAULT_ACCELERATOR_KV_CACHE_FRACTION = 0.5  # of the device memory free after loading weights


class LLM:
    """An offline engine: `LLM(model).generate(prompts, SamplingParams(...))`.

    Args:
      model: a Hugging Face model directory, a .gguf file, a hub id, None for the embedded
        SmolLM2-135M-Instruct, or a folojax.Model already loaded (then dtype, quantization,
        tokenizer and skip_tokenizer_init are its own).
      dtype: "auto" (bfloat16 on an accelerator, float32 on CPU), "float32", "bfloat16", "float16".
      quantization: "auto" (a GGUF's Q4_0, Q4_1 and Q8_0 tensors stay quantized), "none"
        (everything dequantized to dtype), "int8" (linear weights quantized per output channel
        at load time, against activations quantized to int8 on the fly); see load_model.
      max_model_len: longest prompt plus output; default the model's max_position_embeddings.
      seed: randomness for requests without their own seed.
      block_size: tokens per KV-cache block.
      num_kv_blocks: blocks in the pool; None sizes it from kv_cache_memory_bytes, or by default
        512 MiB on CPU and half the free memory on an accelerator (never more than max_num_seqs
        requests of max_model_len need).
      max_num_seqs: requests running at once.
      max_num_batched_tokens: tokens computed per step (default 1024, or max_model_len without
        chunked prefill).
      async_scheduling: schedule and dispatch each step before reading back the previous one's
        tokens (the same outputs; the host works while the device runs).
      num_scheduler_steps: decode tokens computed per request in one dispatch while every
        running request decodes and none waits (vLLM v0's multi-step scheduling; the same
        outputs). The host's work per step is then spent once per that many tokens. The device
        loop ends once every request in it has sampled a stop token; a request beside others
        that go on, or stopped by a stop string, computes up to that many - 1 tokens past its
        stop, which are dropped.
      max_logprobs: the most top-N logprobs a request may ask for.
      background_compile: a step of a shape not compiled yet runs padded to a compiled shape
        that covers it; once its shape has come back a few times, it compiles in a background
        thread (False: where the step is dispatched, which waits for it). The same outputs.
      padded_steps_before_compile: how many times (a few: an offline call's rare shapes cost no
        compile; `folojax serve` takes 1).
      attention_backend: a name of folojax.list_attention_backends(), or "auto" (the fastest
        that serves the model's shapes on this platform; logged); None: the Model's own
        (load_model's argument, "auto" by default). One that cannot serve the model's head_dim
        or the cache's block size or dtype raises a ValueError naming the limit.
      warmup: compile the step's largest shapes before returning (engine/warm_up.py), with a
        progress bar, so that later steps never wait for a compile while one of them covers
        the step (`folojax serve --warmup`).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, *,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 skip_tokenizer_init: bool = False, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 async_scheduling: bool = True, num_scheduler_steps: int = 1,
                 max_logprobs: int = 20, background_compile: bool = True,
                 padded_steps_before_compile: int = 8,
                 warmup: bool = False, quantization: str = "auto",
                 attention_backend: str | None = None):
        _check_engine_args(seed=seed, max_model_len=max_model_len, max_logprobs=max_logprobs,
                           padded_steps_before_compile=padded_steps_before_compile,
                           num_scheduler_steps=num_scheduler_steps)
        check_quantization(quantization)
        if attention_backend is not None:
            check_backend_name(attention_backend)
        self.model = model if isinstance(model, Model) else load_model(
            model, dtype, load_tokenizer=not skip_tokenizer_init, tokenizer=tokenizer,
            quantization=quantization)
        config = self.model.config
        if max_model_len is None:
            max_model_len = config.max_position_embeddings
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 1024 if enable_chunked_prefill else max_model_len
        kv_cache = KVCacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
        kv_cache = dataclasses.replace(kv_cache, num_blocks=_num_kv_blocks(
            config, self.model.dtype, block_size, num_kv_blocks, kv_cache_memory_bytes,
            max_num_seqs, max_model_len))
        self.engine_config = EngineConfig(
            model=config,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      async_scheduling=async_scheduling,
                                      num_scheduler_steps=num_scheduler_steps),
            max_model_len=max_model_len,
            dtype=np.dtype(self.model.dtype).name,
            kv_cache=kv_cache,
            max_logprobs=max_logprobs,
            background_compile=background_compile,
            padded_steps_before_compile=padded_steps_before_compile,
            attention_backend=attention_backend or self.model.attention_backend,
        )
        self.llm_engine = LLMEngine(self.model, self.engine_config, seed=seed)
        if warmup:
            self.llm_engine.warm_up()
        self._request_counter = itertools.count()

    @classmethod
    def from_model(cls, model: Model, **engine_args) -> LLM:
        """An LLM over a model already loaded (load_model), with LLM's engine arguments."""
        return cls(model, **engine_args)

    def get_tokenizer(self):
        return self.model.tokenizer

    def reset_prefix_cache(self) -> None:
        """Empties the prefix cache, so that the next requests compute every prompt token."""
        self.llm_engine.kv_cache_manager.pool.reset_prefix_cache()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Completes each prompt: a string, {"prompt": str}, or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        samplings = self._samplings(sampling_params, len(prompts))
        requests = [self._make_request(p, s) for p, s in zip(prompts, samplings, strict=True)]
        return self._run(requests, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        """Replies to one conversation (a list of {"role", "content"}) or a list of them."""
        tokenizer = self._require_tokenizer("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            ids = apply_chat_template(tokenizer, conversation, add_generation_prompt,
                                      chat_template, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": ids,
                            "prompt": tokenizer.decode(ids, skip_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _samplings(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {num_prompts} "
                             "prompts; pass one, or one per prompt")
        return list(sampling_params)

    def _require_tokenizer(self, what: str):
        if self.model.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, but this LLM was created with "
                             "skip_tokenizer_init=True; pass prompt_token_ids instead")
        return self.model.tokenizer

    def _make_request(self, prompt, sampling: SamplingParams) -> dict:
        """Tokenizes and validates one prompt; returns the arguments of add_request."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict) or not {"prompt", "prompt_token_ids"} & prompt.keys():
            raise TypeError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        text = prompt.get("prompt")
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = self._require_tokenizer("a text prompt")(text).input_ids
        request_id = str(next(self._request_counter))
        self.llm_engine.validate_request(request_id, list(ids), sampling)
        return dict(request_id=request_id, prompt_token_ids=list(ids), sampling_params=sampling,
                    prompt=text)

    def _run(self, requests: list[dict], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        try:
            for request in requests:
                engine.add_request(**request)
            with tqdm(total=len(requests), desc="Generating", disable=not use_tqdm) as progress:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            progress.update(1)
        finally:  # an interrupted run leaves nothing queued behind
            for request in requests:
                if request["request_id"] not in finished:
                    engine.abort_request(request["request_id"])
        return [finished[r["request_id"]] for r in requests]


def _check_engine_args(seed, max_model_len, max_logprobs, padded_steps_before_compile,
                       num_scheduler_steps) -> None:
    """The checks that need no model, made before it loads."""
    validate_seed(seed, "LLM")
    if (isinstance(num_scheduler_steps, bool) or not isinstance(num_scheduler_steps, int)
            or num_scheduler_steps < 1):
        raise ValueError("num_scheduler_steps must be a positive int, got "
                         f"{num_scheduler_steps!r}")
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(
            max_model_len, int) or max_model_len <= 0):
        raise ValueError(f"max_model_len must be a positive int or None, got {max_model_len!r}")
    if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or max_logprobs < 0:
        raise ValueError(f"max_logprobs must be an int >= 0, got {max_logprobs!r}")
    if (isinstance(padded_steps_before_compile, bool)
            or not isinstance(padded_steps_before_compile, int) or padded_steps_before_compile < 1):
        raise ValueError("padded_steps_before_compile must be a positive int, got "
                         f"{padded_steps_before_compile!r}")


def _num_kv_blocks(config: ModelConfig, dtype, block_size: int, num_kv_blocks: int | None,
                   memory_bytes: int | None, max_num_seqs: int, max_model_len: int) -> int:
    if num_kv_blocks is not None:
        return num_kv_blocks
    block_bytes = cache_bytes_per_token(config, dtype) * block_size
    if memory_bytes is not None:
        if memory_bytes < block_bytes:
            raise ValueError(f"kv_cache_memory_bytes={memory_bytes} holds no block: one block "
                             f"of {block_size} tokens takes {block_bytes} bytes")
        return memory_bytes // block_bytes
    enough = max_num_seqs * cdiv(max_model_len, block_size)
    return max(1, min(_default_kv_cache_bytes() // block_bytes, enough))


def _default_kv_cache_bytes() -> int:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_CACHE_BYTES
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * DEFAULT_ACCELERATOR_KV_CACHE_FRACTION)
