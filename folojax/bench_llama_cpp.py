"""llama.cpp (through llama-cpp-python) as a peer of `folojax bench` on the same GGUF file and
workload: an optional extra (`pip install -e ".[llamacpp]"`, which builds llama.cpp from source;
docs/BENCHMARKS.md names the build flags that work on each CPU).

TTFT is the prompt's evaluation plus the first greedy token; TPOT is each later token's
evaluation and greedy pick, medians over `repeats` runs after a warm-up. Batch 1 only: llama.cpp's
Python API decodes one sequence.
"""

import os
import statistics
import time

from folojax.bench import BenchResult


def bench_llama_cpp(path: str, prompts: list[list[int]], max_tokens: int,
                    repeats: int) -> BenchResult:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError("--compare-llama-cpp needs llama-cpp-python: pip install "
                          "llama-cpp-python (see docs/BENCHMARKS.md for its build flags)") from None
    if len(prompts) != 1:
        raise ValueError(f"--compare-llama-cpp runs batch 1 only, got --batch-size {len(prompts)}")
    [prompt] = prompts
    llm = Llama(model_path=path, n_ctx=len(prompt) + max_tokens, n_batch=len(prompt),
                n_threads=os.cpu_count(), verbose=False)

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(temp=0.0)  # greedy
        first = time.perf_counter()
        for _ in range(max_tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return first - start, (time.perf_counter() - first) / (max_tokens - 1)

    run()  # warm-up
    runs = [run() for _ in range(repeats)]
    return BenchResult("llama.cpp", statistics.median(ttft for ttft, _ in runs),
                       statistics.median(tpot for _, tpot in runs), 1, len(prompt))
