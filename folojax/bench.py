"""`folojax bench`: TTFT, TPOT and tokens/s of folojax, and of transformers+torch (--compare-hf)
and llama.cpp (--compare-llama-cpp, a GGUF file) on the same model and workload in the same run;
with several --quantization choices, folojax once per choice, each loaded in turn.

Workload: batch_size prompts of prompt_len random token ids, then max_tokens greedy tokens with
EOS ignored. Compilation is measured separately: the first (warm-up) run pays it, the timed runs
don't. For transformers, TTFT is `generate(max_new_tokens=1)` and TPOT is
(generate(max_new_tokens=max_tokens) - TTFT) / (max_tokens - 1): both timings contain the same
prefill, so the difference is decoding alone.
"""

import dataclasses
import os
import statistics
import time

import jax
import numpy as np

from folojax.engine.generate import generate
from folojax.model.decoder import num_compiles
from folojax.ops.attention_backends import check_backend_name
from folojax.ops.paged_kv_cache import init_cache
from folojax.sampling_params import SamplingParams
from folojax.weights.loader import load_model, resolve_dtype, resolve_model_path
from folojax.weights.quantized import check_quantization


@dataclasses.dataclass
class StreamingLimit:
    """What batch-1 decode is bound by: the bytes of weights a token reads, and the rate this
    machine streams weights through a matrix-vector product (numpy, measured now)."""

    weight_bytes: int
    bytes_per_second: float

    @property
    def seconds_per_token(self) -> float:
        return self.weight_bytes / self.bytes_per_second


def decode_weight_bytes(params) -> int:
    """Bytes of weights one decode token reads: all of them, but only a row of an untied
    embedding."""
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    return total - (params.embed.nbytes if params.lm_head is not None else 0)


def measure_streaming_rate(num_bytes: int, repeats: int = 5) -> float:
    """Bytes per second of numpy float32 matrix-vector products over `num_bytes` of matrices
    (1,024 columns each; at least 256 MB, so the caches don't hold them); best of `repeats`."""
    columns = 1024
    rows = max(num_bytes, 256 << 20) // (4 * columns)
    matrices = [np.ones((chunk, columns), np.float32)
                for chunk in [4096] * (rows // 4096) + ([rows % 4096] if rows % 4096 else [])]
    vector = np.ones(columns, np.float32)
    total = sum(m.nbytes for m in matrices)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for matrix in matrices:
            matrix @ vector
        best = min(best, time.perf_counter() - start)
    return total / best


@dataclasses.dataclass
class BenchResult:
    name: str
    ttft: float  # seconds: prefill of the whole batch + first token
    tpot: float  # seconds per decode step (one token for every row)
    batch_size: int
    prompt_len: int
    compile_seconds: float | None = None
    num_compiles: int | None = None
    weight_bytes: int | None = None  # read per decode token, where known

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch_size / self.tpot

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch_size * self.prompt_len / self.ttft


def workload(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (batch_size, prompt_len)).tolist()


def bench_llm(model, prompts, max_tokens: int, repeats: int, name: str = "folojax LLM",
              num_scheduler_steps: int = 1, attention_backend: str = "auto") -> BenchResult:
    """The same workload through folojax.LLM (the engine), on the already loaded model."""
    from folojax.engine.llm import LLM

    # No prefix caching: the repeated runs would otherwise find their prompts cached.
    llm = LLM.from_model(model, max_model_len=len(prompts[0]) + max_tokens,
                         max_num_seqs=len(prompts), enable_prefix_caching=False,
                         num_scheduler_steps=num_scheduler_steps,
                         attention_backend=attention_backend)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]

    def run():
        start = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        return outputs[0].metrics, time.perf_counter() - start

    return _timed_runs(name, run, prompts, repeats, decode_weight_bytes(model.params))


def bench_folojax(model, prompts, max_tokens: int, repeats: int, name: str = "folojax",
                  attention_backend: str = "auto") -> BenchResult:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    max_seq_len = len(prompts[0]) + max_tokens

    def run():
        cache = init_cache(model.config, len(prompts), max_seq_len, model.dtype)
        start = time.perf_counter()
        result = generate(model.params, cache, jax.random.key(0), prompts, config=model.config,
                          sampling=sampling, attention_backend=attention_backend)
        return result.metrics[0], time.perf_counter() - start

    return _timed_runs(name, run, prompts, repeats, decode_weight_bytes(model.params))


def _timed_runs(name: str, run, prompts, repeats: int, weight_bytes: int | None = None
                ) -> BenchResult:
    """A warm-up run (it compiles: counted and timed), then `repeats` runs, medians reported.
    `run() -> (the first request's RequestMetrics, seconds)`."""
    compiles_before = num_compiles()
    _, warmup_seconds = run()
    compiles = num_compiles() - compiles_before
    runs = [run() for _ in range(repeats)]
    ttft = statistics.median(metrics.ttft for metrics, _ in runs)
    tpot = statistics.median(metrics.tpot for metrics, _ in runs)
    steady = statistics.median(seconds for _, seconds in runs)
    return BenchResult(name, ttft, tpot, len(prompts), len(prompts[0]),
                       compile_seconds=max(warmup_seconds - steady, 0.0), num_compiles=compiles,
                       weight_bytes=weight_bytes)


def load_torch_model(path: str, dtype: str):
    """The transformers model of a checkpoint (directory or .gguf), on the GPU if torch sees one."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    kwargs = {}
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    return model.to(device).eval(), device


def bench_transformers(path: str, dtype: str, prompts, max_tokens: int,
                       repeats: int) -> BenchResult:
    import torch

    model, device = load_torch_model(path, dtype)
    ids = torch.tensor(prompts, device=device)

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def generate(num_tokens):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                      do_sample=False, pad_token_id=0)

    timed(generate(max_tokens))  # warm-up
    ttft = statistics.median(timed(generate(1)) for _ in range(repeats))
    total = statistics.median(timed(generate(max_tokens)) for _ in range(repeats))
    return BenchResult("transformers", ttft, (total - ttft) / (max_tokens - 1), len(prompts),
                       len(prompts[0]))


def run_bench(model_path: str | None, dtype: str = "auto", batch_size: int = 1,
              prompt_len: int = 128, max_tokens: int = 64, repeats: int = 3,
              compare_hf: bool = False, quantizations: tuple[str, ...] = ("auto",),
              compare_llama_cpp: bool = False, num_scheduler_steps: int = 1,
              attention_backends: tuple[str, ...] = ("auto",)
              ) -> tuple[list[BenchResult], StreamingLimit]:
    """folojax.generate and folojax.LLM (with num_scheduler_steps) for each of `quantizations`
    (load_model's choices, each loaded in turn) and of `attention_backends`, then transformers
    (compare_hf) and llama.cpp (compare_llama_cpp, on the same GGUF file) on the workload, and
    the machine's weight-streaming limit for the first choice's weights."""
    if max_tokens < 2:
        raise ValueError("bench needs max_tokens >= 2 to measure decoding")
    for quantization in quantizations:
        check_quantization(quantization)
    for backend in attention_backends:
        check_backend_name(backend)
    path = resolve_model_path(model_path)
    if compare_llama_cpp and not path.endswith(".gguf"):
        raise ValueError(f"--compare-llama-cpp needs a .gguf file, got {path}")
    results, limit = [], None
    for quantization in quantizations:
        model = load_model(path, dtype, load_tokenizer=False, quantization=quantization,
                           progress=False)
        prompts = workload(model.config.vocab_size, batch_size, prompt_len)
        if limit is None:
            weight_bytes = decode_weight_bytes(model.params)
            limit = StreamingLimit(weight_bytes, measure_streaming_rate(weight_bytes))
        for backend in attention_backends:
            suffix = choice_suffix((quantization, quantizations), (backend, attention_backends))
            results += [bench_folojax(model, prompts, max_tokens, repeats, "folojax" + suffix,
                                      backend),
                        bench_llm(model, prompts, max_tokens, repeats, "folojax LLM" + suffix,
                                  num_scheduler_steps, backend)]
        del model
    if compare_hf:
        results.append(bench_transformers(path, np.dtype(resolve_dtype(dtype)).name, prompts,
                                          max_tokens, repeats))
    if compare_llama_cpp:
        from folojax.bench_llama_cpp import bench_llama_cpp

        results.append(bench_llama_cpp(path, prompts, max_tokens, repeats))
    return results, limit


def choice_suffix(*choices: tuple[str, tuple[str, ...]]) -> str:
    """A run's name suffix: " [choice]" for each (choice, its options) with several options."""
    return "".join(f" [{choice}]" for choice, options in choices if len(options) > 1)


def format_results(results: list[BenchResult], limit: StreamingLimit | None = None) -> str:
    width = max(14, *(len(r.name) + 2 for r in results))
    lines = [f"{'engine':<{width}}{'TTFT ms':>10}{'TPOT ms':>10}{'decode tok/s':>14}"
             f"{'prefill tok/s':>15}{'compile s':>11}{'compiles':>10}{'weights MB':>12}"]
    for r in results:
        compile_s = f"{r.compile_seconds:.1f}" if r.compile_seconds is not None else "-"
        compiles = str(r.num_compiles) if r.num_compiles is not None else "-"
        weights = f"{r.weight_bytes / 1e6:.0f}" if r.weight_bytes is not None else "-"
        lines.append(f"{r.name:<{width}}{r.ttft * 1e3:>10.1f}{r.tpot * 1e3:>10.2f}"
                     f"{r.decode_tokens_per_second:>14.1f}{r.prefill_tokens_per_second:>15.1f}"
                     f"{compile_s:>11}{compiles:>10}{weights:>12}")
    for peer in ("transformers", "llama.cpp"):
        reference = next((r for r in results if r.name == peer), None)
        for ours in results:
            if reference is not None and ours.name.startswith("folojax"):
                speedup = ours.decode_tokens_per_second / reference.decode_tokens_per_second
                lines.append(f"{ours.name} / {peer}: decode tok/s x{speedup:.2f}, "
                             f"prefill (TTFT) x{reference.ttft / ours.ttft:.2f}")
    if limit is not None:
        lines.append(f"this machine streams {limit.bytes_per_second / 1e9:.1f} GB/s (numpy "
                     f"GEMV): {limit.seconds_per_token * 1e3:.1f} ms/token at best for the "
                     f"{limit.weight_bytes / 1e6:.0f} MB the first folojax reads per token")
        for r in results:
            if r.batch_size == 1 and r.weight_bytes is not None:
                rate = r.weight_bytes / r.tpot
                lines.append(f"{r.name}: {rate / 1e9:.1f} GB/s achieved, "
                             f"x{rate / limit.bytes_per_second:.2f} of the streaming limit")
    return "\n".join(lines)
