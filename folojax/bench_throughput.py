"""`folojax bench --throughput`: many requests of mixed prompt lengths through the engine, and
(--compare-hf) through transformers+torch on the same model and workload in the same run: its
static padded `generate` (all requests in one left-padded batch) and its continuous-batching
`generate_batch`. Also the median TTFT of requests whose long prefix an earlier request computed,
with prefix caching on and off.

Output tokens/s = all requests' output tokens / wall time of the whole run. folojax runs the
workload once to compile (counted and timed apart) and is then timed; torch needs no warm-up
beyond one short call. With `--repeats N` the engines take turns, N rounds, and each reports its
median run: this machine's speed drifts by tens of percent over minutes, which a single run of
each, minutes apart, mistakes for a difference between engines. transformers runs in a process
of its own (spawned, waiting on a pipe between its turns), so neither engine runs in a heap or
beside threads that the other left behind (folojax's first run after `generate_batch` in the
same process was measurably slower: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import time
from collections.abc import Callable

import numpy as np

from folojax.bench import choice_suffix, load_torch_model
from folojax.engine.llm import LLM
from folojax.model.decoder import num_compiles
from folojax.runner.model_runner import wait_for_background_compiles
from folojax.sampling_params import SamplingParams


@dataclasses.dataclass
class ThroughputResult:
    name: str
    seconds: float  # the median run's
    num_requests: int
    num_output_tokens: int
    num_prompt_tokens: int
    num_compiles: int | None = None
    compile_seconds: float | None = None
    run_seconds: list[float] = dataclasses.field(default_factory=list)  # every round's
    process_id: int = dataclasses.field(default_factory=os.getpid)  # the process it ran in

    @property
    def output_tokens_per_second(self) -> float:
        return self.num_output_tokens / self.seconds


@dataclasses.dataclass
class PrefixResult:
    ttft_cached: float  # medians over the measured requests
    ttft_uncached: float
    num_cached_tokens: int  # the fewest of any measured request, with caching on
    prefix_len: int
    ttfts_cached: list[float] = dataclasses.field(default_factory=list)  # every measured one's
    ttfts_uncached: list[float] = dataclasses.field(default_factory=list)


def throughput_workload(vocab_size: int, num_requests: int, min_prompt: int, max_prompt: int,
                        seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_prompt, max_prompt + 1, num_requests)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


def folojax_runner(llm: LLM, prompts, max_tokens: int, name: str = "folojax"
                   ) -> Callable[[], ThroughputResult]:
    """Runs the workload once to compile; returns a function that times one run."""
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]

    def generate():
        llm.reset_prefix_cache()  # or every prompt would be found cached
        start = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        return outputs, time.perf_counter() - start

    def step_compiles() -> int:
        return num_compiles("paged_step") + num_compiles("paged_decode_steps")

    compiles_before = step_compiles()
    _, warmup_seconds = generate()
    start = time.perf_counter()
    wait_for_background_compiles()  # the shapes it met often enough: theirs too
    warmup_seconds += time.perf_counter() - start
    compiles = step_compiles() - compiles_before

    def run() -> ThroughputResult:
        outputs, seconds = generate()
        return ThroughputResult(
            name, seconds, len(prompts), sum(len(o.outputs[0].token_ids) for o in outputs),
            sum(map(len, prompts)), num_compiles=compiles,
            compile_seconds=max(warmup_seconds - seconds, 0.0))

    return run


def hf_static_runner(model, device: str, prompts,
                     max_tokens: int) -> Callable[[], ThroughputResult]:
    """All requests in one left-padded batch through `model.generate`."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def generate(rows: int, num_tokens: int):
        with torch.inference_mode():
            return model.generate(ids[:rows], attention_mask=mask[:rows], do_sample=False,
                                  max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                  pad_token_id=0)

    generate(1, 2)  # warm-up

    def run() -> ThroughputResult:
        start = _synchronized_time(device)
        out = generate(len(prompts), max_tokens)
        seconds = _synchronized_time(device) - start
        return ThroughputResult("hf generate", seconds, len(prompts),
                                (out.shape[1] - width) * len(prompts), sum(map(len, prompts)))

    return run


def hf_generate_batch_runner(model, device: str, prompts,
                             max_tokens: int) -> Callable[[], ThroughputResult]:
    """transformers' own continuous batching (`generate_batch`)."""
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=max_tokens, do_sample=False,
                                           eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:1], generation_config=config)  # warm-up

    def run() -> ThroughputResult:
        start = _synchronized_time(device)
        outputs = model.generate_batch(prompts, generation_config=config)
        seconds = _synchronized_time(device) - start
        return ThroughputResult("hf generate_batch", seconds, len(prompts),
                                sum(len(o.generated_tokens) for o in outputs.values()),
                                sum(map(len, prompts)))

    return run


def _transformers_worker(connection, model_path: str, dtype: str, prompts,
                         max_tokens: int) -> None:
    """In the spawned process: loads the model, then runs the engine named by each message."""
    model, device = load_torch_model(model_path, dtype)
    runners = {"hf generate": hf_static_runner(model, device, prompts, max_tokens),
               "hf generate_batch": hf_generate_batch_runner(model, device, prompts, max_tokens)}
    connection.send(list(runners))
    while (name := connection.recv()) is not None:
        connection.send(runners[name]())


def transformers_runners(model_path: str, dtype: str, prompts, max_tokens: int):
    """transformers' static `generate` and `generate_batch`, run in a spawned process; returns
    their runners and a function that stops the process."""
    context = multiprocessing.get_context("spawn")
    connection, child = context.Pipe()
    process = context.Process(target=_transformers_worker, daemon=True,
                              args=(child, model_path, dtype, prompts, max_tokens))
    process.start()

    def receive():
        try:
            return connection.recv()
        except EOFError as error:
            process.join()
            raise RuntimeError(f"the transformers process exited (code {process.exitcode})"
                               ) from error

    def runner(name: str) -> Callable[[], ThroughputResult]:
        def run() -> ThroughputResult:
            connection.send(name)
            return receive()

        return run

    names = receive()

    def stop() -> None:
        if process.is_alive():
            connection.send(None)
        process.join()

    return [runner(name) for name in names], stop


def interleaved_rounds(runners: list[Callable[[], ThroughputResult]],
                       repeats: int) -> list[ThroughputResult]:
    """Runs every engine once per round, `repeats` rounds, so that a slow minute of the machine
    hits all of them; each engine's result is its median run (with every round's seconds)."""
    rounds = [[run() for run in runners] for _ in range(repeats)]
    results = []
    for runs in zip(*rounds, strict=True):
        median = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
        results.append(dataclasses.replace(median, run_seconds=[r.seconds for r in runs]))
    return results


def _synchronized_time(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def bench_prefix_ttft(make_llm, vocab_size: int, prefix_len: int, suffix_len: int = 24,
                      max_tokens: int = 8, num_measured: int = 5) -> PrefixResult:
    """TTFT of requests sharing a long prefix, one after another, with prefix caching on and
    off: the median over `num_measured` of them, after two (the first computes the prefix, the
    second compiles the shapes the others use). One request's TTFT is a single ~0.1 s step,
    which this machine's drift can stretch by tens of percent; the median is steadier."""
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, vocab_size, prefix_len).tolist()
    prompts = [prefix + rng.integers(0, vocab_size, suffix_len).tolist()
               for _ in range(2 + num_measured)]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    for caching in (True, False):
        llm = make_llm(enable_prefix_caching=caching)
        outputs = [llm.generate({"prompt_token_ids": prompt}, sampling, use_tqdm=False)[0]
                   for prompt in prompts]
        results.append(outputs[2:])
        del llm
    cached, uncached = ([o.metrics.ttft for o in measured] for measured in results)
    return PrefixResult(float(np.median(cached)), float(np.median(uncached)),
                        min(o.num_cached_tokens for o in results[0]), prefix_len, cached,
                        uncached)


def run_throughput_bench(model_path: str, dtype: str = "auto", num_requests: int = 48,
                         min_prompt: int = 32, max_prompt: int = 256, max_tokens: int = 64,
                         max_num_seqs: int | tuple[int, ...] = 256,
                         max_num_batched_tokens: int = 1024,
                         prefix_len: int = 1000, compare_hf: bool = False, repeats: int = 1,
                         quantizations: tuple[str, ...] = ("auto",), num_scheduler_steps: int = 1,
                         attention_backends: tuple[str, ...] = ("auto",)):
    """The workload through LLM (with num_scheduler_steps) once per choice of `quantizations`
    (load_model's), of `attention_backends` and of `max_num_seqs` (one or several), and
    (compare_hf) through transformers, in interleaved rounds; then the prefix-cache TTFT with
    the first choices."""
    from folojax.ops.attention_backends import check_backend_name
    from folojax.weights.loader import resolve_dtype
    from folojax.weights.quantized import check_quantization

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    for quantization in quantizations:
        check_quantization(quantization)
    for backend in attention_backends:
        check_backend_name(backend)
    seq_limits = (max_num_seqs,) if isinstance(max_num_seqs, int) else tuple(max_num_seqs)
    if not seq_limits or any(not isinstance(n, int) or n < 1 for n in seq_limits):
        raise ValueError(f"max_num_seqs must be positive ints, got {max_num_seqs!r}")

    max_model_len = max(max_prompt, prefix_len + 24) + max_tokens

    def make_llm(quantization: str = quantizations[0], attention_backend=attention_backends[0],
                 seq_limit: int = seq_limits[0], **kwargs):
        return LLM(model_path, dtype=dtype, skip_tokenizer_init=True,
                   max_model_len=max_model_len, max_num_seqs=seq_limit,
                   max_num_batched_tokens=max_num_batched_tokens, quantization=quantization,
                   num_scheduler_steps=num_scheduler_steps, attention_backend=attention_backend,
                   **kwargs)

    runners, stop, prompts = [], None, None
    seq_names = tuple(f"max_num_seqs={n}" for n in seq_limits)
    for quantization, backend, seq_limit in itertools.product(quantizations, attention_backends,
                                                              seq_limits):
        llm = make_llm(quantization, backend, seq_limit)
        vocab_size = llm.model.config.vocab_size
        if prompts is None:
            prompts = throughput_workload(vocab_size, num_requests, min_prompt, max_prompt)
        name = "folojax" + choice_suffix((quantization, quantizations),
                                         (backend, attention_backends),
                                         (f"max_num_seqs={seq_limit}", seq_names))
        runners.append(folojax_runner(llm, prompts, max_tokens, name))
    if compare_hf:
        hf_runners, stop = transformers_runners(model_path, np.dtype(resolve_dtype(dtype)).name,
                                                prompts, max_tokens)
        runners += hf_runners
    try:
        results = interleaved_rounds(runners, repeats)
    finally:
        if stop is not None:
            stop()
    del llm, runners  # every LLM: the runners held the others
    prefix = bench_prefix_ttft(make_llm, vocab_size, prefix_len) if prefix_len else None
    return results, prefix


def format_throughput(results: list[ThroughputResult], prefix: PrefixResult | None) -> str:
    width = max(20, *(len(r.name) + 2 for r in results))
    lines = [f"{'engine':<{width}}{'seconds':>9}{'output tok/s':>14}{'compile s':>11}"
             f"{'compiles':>10}  seconds per round"]
    for r in results:
        compile_s = f"{r.compile_seconds:.1f}" if r.compile_seconds is not None else "-"
        compiles = str(r.num_compiles) if r.num_compiles is not None else "-"
        rounds = " ".join(f"{seconds:.2f}" for seconds in r.run_seconds)
        lines.append(f"{r.name:<{width}}{r.seconds:>9.2f}{r.output_tokens_per_second:>14.1f}"
                     f"{compile_s:>11}{compiles:>10}  {rounds}")
    ours = [r for r in results if r.name.startswith("folojax")]
    references = [r for r in results if not r.name.startswith("folojax")]
    comparisons = []
    if references:
        best = max(references, key=lambda r: r.output_tokens_per_second)
        comparisons = [(mine, best, f"best transformers path ({best.name})") for mine in ours]
    comparisons += [(mine, ours[0], ours[0].name) for mine in ours[1:]]
    for mine, theirs, label in comparisons:
        per_round = " ".join(f"x{their_seconds / my_seconds:.2f}" for my_seconds, their_seconds
                             in zip(mine.run_seconds, theirs.run_seconds, strict=True))
        lines.append(f"{mine.name} / {label}: output tok/s x"
                     f"{mine.output_tokens_per_second / theirs.output_tokens_per_second:.2f} "
                     f"(medians; per round: {per_round})")
    if prefix is not None:
        lines.append(f"shared {prefix.prefix_len}-token prefix, median TTFT of "
                     f"{len(prefix.ttfts_cached)} later requests: "
                     f"{prefix.ttft_cached * 1e3:.1f} ms with prefix caching "
                     f"({prefix.num_cached_tokens} tokens cached) vs "
                     f"{prefix.ttft_uncached * 1e3:.1f} ms without: x"
                     f"{prefix.ttft_uncached / prefix.ttft_cached:.1f}")
    return "\n".join(lines)

