"""folojax.LLM: vLLM's offline API (generate, chat) over the functional generate loop.

Requests are validated and tokenized first, so bad input raises before any device work and the
LLM stays usable. They then run as padded batches of up to max_num_seqs rows (continuous batching
comes with the paged engine). SamplingParams(n=k) takes k rows; child j > 0 of a seeded request
gets a seed spawned from (seed, j), so child 0 matches the same request with n=1.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
from tqdm.auto import tqdm

from folojax.config import EngineConfig, SchedulerConfig
from folojax.engine.buckets import bucket
from folojax.engine.generate import generate, validate_prompt
from folojax.ops.kv_cache import init_cache
from folojax.outputs import CompletionOutput, RequestOutput
from folojax.sampling_params import SamplingParams
from folojax.tokenizer import apply_chat_template
from folojax.weights.loader import load_model

MIN_CACHE_BUCKET = 256  # cache lengths are bucketed too: each shape compiles its own step


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling: SamplingParams


class LLM:
    """An offline engine: `LLM(model).generate(prompts, SamplingParams(...))`.

    Args:
      model: a Hugging Face model directory, a .gguf file, a hub id, or None for the embedded
        SmolLM2-135M-Instruct.
      dtype: "auto" (bfloat16 on an accelerator, float32 on CPU), "float32", "bfloat16", "float16".
      max_model_len: longest prompt plus output; default the model's max_position_embeddings.
      seed: randomness for requests without their own seed.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, *,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 skip_tokenizer_init: bool = False, max_num_seqs: int = 16):
        self.model = load_model(model, dtype, load_tokenizer=not skip_tokenizer_init,
                                tokenizer=tokenizer)
        config = self.model.config
        self.engine_config = EngineConfig(
            model=config,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
            max_model_len=max_model_len or config.max_position_embeddings,
            dtype=np.dtype(self.model.dtype).name,
        )
        self._key = jax.random.key(seed)
        self._request_counter = itertools.count()
        self._batch_counter = itertools.count()

    def get_tokenizer(self):
        return self.model.tokenizer

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

    def _make_request(self, prompt, sampling: SamplingParams) -> _Request:
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(sampling).__name__}")
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict) or not {"prompt", "prompt_token_ids"} & prompt.keys():
            raise TypeError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        text = prompt.get("prompt")
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = self._require_tokenizer("a text prompt")(text).input_ids
        ids = list(ids)
        if sampling.stop and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was set)")
        max_model_len = self.engine_config.max_model_len
        validate_prompt(ids, self.model.config.vocab_size, max_model_len)
        return _Request(str(next(self._request_counter)), text, [int(t) for t in ids], sampling)

    def _rows(self, requests: list[_Request]) -> list[tuple[int, int, SamplingParams]]:
        """(request index, child index, sampling) for every completion to generate."""
        rows = []
        for index, request in enumerate(requests):
            sampling = request.sampling
            for child in range(sampling.n):
                seed = sampling.seed
                if seed is not None and child > 0:
                    spawned = np.random.SeedSequence(seed, spawn_key=(child,))
                    seed = int(spawned.generate_state(1)[0])
                rows.append((index, child, dataclasses.replace(sampling, n=1, seed=seed)))
        return rows

    def _run(self, requests: list[_Request], use_tqdm: bool) -> list[RequestOutput]:
        completions: list[list[CompletionOutput | None]] = [[None] * r.sampling.n for r in requests]
        metrics = [None] * len(requests)
        rows = self._rows(requests)
        max_num_seqs = self.engine_config.scheduler.max_num_seqs
        with tqdm(total=len(requests), desc="Generating", disable=not use_tqdm) as progress:
            for begin in range(0, len(rows), max_num_seqs):
                batch_rows = rows[begin:begin + max_num_seqs]
                result = self._run_batch(requests, batch_rows)
                for i, (index, child, _) in enumerate(batch_rows):
                    completions[index][child] = CompletionOutput(
                        index=child,
                        text=result.texts[i] if result.texts is not None else "",
                        token_ids=result.token_ids[i],
                        finish_reason=result.finish_reasons[i],
                        stop_reason=result.stop_reasons[i],
                        logprobs=result.logprobs[i],
                    )
                    if child == 0:
                        metrics[index] = result.metrics[i]
                progress.update(sum(1 for index, child, _ in batch_rows
                                    if child == requests[index].sampling.n - 1))
        return [RequestOutput(request_id=r.request_id, prompt=r.prompt,
                              prompt_token_ids=r.prompt_token_ids, outputs=completions[i],
                              metrics=metrics[i]) for i, r in enumerate(requests)]

    def _run_batch(self, requests: list[_Request], batch_rows):
        max_model_len = self.engine_config.max_model_len
        prompts = [requests[index].prompt_token_ids for index, _, _ in batch_rows]
        samplings = [sampling for _, _, sampling in batch_rows]
        needed = max(len(p) + (s.max_tokens or max_model_len)
                     for p, s in zip(prompts, samplings, strict=True))
        cache = init_cache(
            self.model.config,
            batch_size=bucket(len(prompts), 1, self.engine_config.scheduler.max_num_seqs),
            max_seq_len=bucket(needed, MIN_CACHE_BUCKET, max_model_len),
            dtype=self.model.dtype,
        )
        key = jax.random.fold_in(self._key, next(self._batch_counter))
        return generate(self.model.params, cache, key, prompts, config=self.model.config,
                        sampling=samplings, tokenizer=self.model.tokenizer)
