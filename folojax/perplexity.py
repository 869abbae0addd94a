"""`folojax perplexity`: a model's perplexity on a text, from the engine's prompt logprobs, and
(compare_hf) transformers' on the same checkpoint, text and windows.

The text's tokens are cut into consecutive windows of `context_len` tokens (the last may be
shorter); within each, every token after the first is scored given the ones before it, so each
window starts afresh, as Hugging Face's perplexity guide does with a stride equal to the length.
Perplexity = exp(the mean negative log-likelihood of all scored tokens).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from folojax.sampling_params import SamplingParams


@dataclasses.dataclass
class PerplexityResult:
    name: str
    perplexity: float
    num_scored_tokens: int
    seconds: float


def windows(token_ids: list[int], context_len: int) -> list[list[int]]:
    """Consecutive windows of context_len tokens; a last window of a single token scores
    nothing and is dropped."""
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2 (a window scores its tokens after the first), "
                         f"got {context_len}")
    cut = [token_ids[i:i + context_len] for i in range(0, len(token_ids), context_len)]
    cut = [window for window in cut if len(window) > 1]
    if not cut:
        raise ValueError(f"the text has {len(token_ids)} token(s): at least 2 are needed")
    return cut


def _result(name: str, negative_log_likelihood: float, num_scored: int,
            seconds: float) -> PerplexityResult:
    return PerplexityResult(name, math.exp(negative_log_likelihood / num_scored), num_scored,
                            seconds)


def folojax_perplexity(llm, token_windows: list[list[int]], name: str = "folojax"
                       ) -> PerplexityResult:
    """Through LLM: every window one request with prompt_logprobs=0 and one output token."""
    sampling = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in token_windows], sampling,
                           use_tqdm=False)
    seconds = time.perf_counter() - start
    nll = -sum(entry[token] for window, output in zip(token_windows, outputs, strict=True)
               for token, entry in zip(window[1:], output.prompt_logprobs[1:], strict=True))
    return _result(name, nll, sum(len(w) - 1 for w in token_windows), seconds)


def transformers_perplexity(path: str, dtype: str, token_windows: list[list[int]]
                            ) -> PerplexityResult:
    import torch

    from folojax.bench import load_torch_model

    model, device = load_torch_model(path, dtype)
    nll, start = 0.0, time.perf_counter()
    with torch.inference_mode():
        for window in token_windows:
            ids = torch.tensor([window], device=device)
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            nll -= logprobs.gather(-1, ids[0, 1:, None]).sum().item()
    return _result("transformers", nll, sum(len(w) - 1 for w in token_windows),
                   time.perf_counter() - start)


def run_perplexity(model_path: str | None, text: str, dtype: str = "auto",
                   quantizations: tuple[str, ...] = ("auto",), context_len: int = 1024,
                   compare_hf: bool = False) -> list[PerplexityResult]:
    """folojax once per choice of `quantizations` (each loaded in turn), then (compare_hf)
    transformers, on the same windows of the text's tokens (tokenized by the first folojax
    model's tokenizer, without special tokens)."""
    from folojax.engine.llm import LLM
    from folojax.weights.loader import resolve_dtype, resolve_model_path
    from folojax.weights.quantized import check_quantization

    for quantization in quantizations:
        check_quantization(quantization)
    if not text.strip():
        raise ValueError("the text is empty")
    path = resolve_model_path(model_path)
    results, token_windows = [], None
    for quantization in quantizations:
        llm = LLM(path, dtype=dtype, quantization=quantization, max_model_len=context_len + 1,
                  enable_prefix_caching=False)
        if token_windows is None:
            token_ids = llm.get_tokenizer()(text, add_special_tokens=False).input_ids
            token_windows = windows(token_ids, context_len)
        name = "folojax" if len(quantizations) == 1 else f"folojax [{quantization}]"
        results.append(folojax_perplexity(llm, token_windows, name))
        del llm
    if compare_hf:
        results.append(transformers_perplexity(path, np.dtype(resolve_dtype(dtype)).name,
                                               token_windows))
    return results


def format_perplexity(results: list[PerplexityResult]) -> str:
    width = max(14, *(len(r.name) + 2 for r in results))
    lines = [f"{'engine':<{width}}{'perplexity':>12}{'tokens':>9}{'seconds':>9}"]
    lines += [f"{r.name:<{width}}{r.perplexity:>12.4f}{r.num_scored_tokens:>9}{r.seconds:>9.1f}"
              for r in results]
    ours = [r for r in results if r.name.startswith("folojax")]
    references = [r for r in results if r.name == "transformers"] + ours[:1]
    for reference in references:
        for r in ours:
            if r is not reference:
                lines.append(f"{r.name} / {reference.name}: perplexity "
                             f"{100 * (r.perplexity / reference.perplexity - 1):+.2f}%")
    return "\n".join(lines)
