"""`folojax bench --first-call`: what a user's first call costs. Each engine runs in a fresh
process: load the model, run the throughput workload (folojax/bench_throughput.py) once — the
first call, compilation included — and once more. folojax runs twice, first with an empty cache
directory (no compiled kernels, no persistent XLA cache: cold), then with the cache the first run
left (warm: a second process); transformers+torch once (load, then its static padded generate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from folojax.bench import load_torch_model
from folojax.bench_throughput import hf_static_runner, throughput_workload
from folojax.engine.llm import LLM
from folojax.sampling_params import SamplingParams

_CHILD = """
import json, sys, time
start = time.perf_counter()
engine, model_path, dtype, num_requests, min_prompt, max_prompt, max_tokens = sys.argv[1:8]
num_requests, min_prompt, max_prompt, max_tokens = map(int, (num_requests, min_prompt,
                                                             max_prompt, max_tokens))
from folojax.bench_first_call import folojax_first_call, hf_first_call
run = folojax_first_call if engine == "folojax" else hf_first_call
result = run(model_path, dtype, num_requests, min_prompt, max_prompt, max_tokens, start)
print("RESULT " + json.dumps(result))
"""


@dataclasses.dataclass
class FirstCallResult:
    name: str
    load_seconds: float  # from process start (imports included) to a loaded engine
    first_seconds: float  # from process start to the end of the first call
    second_call_seconds: float
    num_output_tokens: int
    num_compiles: int | None = None

    @property
    def first_tokens_per_second(self) -> float:
        return self.num_output_tokens / self.first_seconds


def _run_child(name: str, engine: str, args: list[str], env: dict) -> FirstCallResult:
    run = subprocess.run([sys.executable, "-c", _CHILD, engine, *args], capture_output=True,
                         text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"the {name} run failed:\n{run.stderr[-3000:]}")
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return FirstCallResult(name=name, **json.loads(line[len("RESULT "):]))


def run_first_call_bench(model_path: str, dtype: str, num_requests: int = 48,
                         min_prompt: int = 32, max_prompt: int = 256,
                         max_tokens: int = 64, compare_hf: bool = True) -> list[FirstCallResult]:
    args = [model_path, dtype, str(num_requests), str(min_prompt), str(max_prompt),
            str(max_tokens)]
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, FOLOJAX_CACHE_DIR=cache_dir, FOLOJAX_COMPILATION_CACHE="1")
        results = [_run_child("folojax, cold caches", "folojax", args, env),
                   _run_child("folojax, warm caches", "folojax", args, env)]
    if compare_hf:
        results.append(_run_child("transformers", "hf", args, dict(os.environ)))
    return results


def format_first_call(results: list[FirstCallResult]) -> str:
    lines = [f"{'engine':<24}{'load s':>8}{'to 1st done s':>15}{'1st tok/s':>11}"
             f"{'2nd call s':>12}{'compiles':>10}"]
    for r in results:
        compiles = "-" if r.num_compiles is None else str(r.num_compiles)
        lines.append(f"{r.name:<24}{r.load_seconds:>8.2f}{r.first_seconds:>15.2f}"
                     f"{r.first_tokens_per_second:>11.1f}{r.second_call_seconds:>12.2f}"
                     f"{compiles:>10}")
    reference = next((r for r in results if r.name == "transformers"), None)
    if reference is not None:
        for r in results:
            if r is not reference:
                lines.append(f"{r.name} / transformers, load + first call: x"
                             f"{reference.first_seconds / r.first_seconds:.2f}; second call: x"
                             f"{reference.second_call_seconds / r.second_call_seconds:.2f}")
    return "\n".join(lines)


def folojax_first_call(model_path: str, dtype: str, num_requests: int, min_prompt: int,
                       max_prompt: int, max_tokens: int, start: float) -> dict:
    """For bench --first-call, in a fresh process: LLM with its default settings, then the
    workload twice. `start`: when the process started (imports count as load time)."""
    from folojax.model.decoder import num_compiles

    llm = LLM(model_path, dtype=dtype, skip_tokenizer_init=True,
              max_model_len=max_prompt + max_tokens)
    loaded = time.perf_counter()
    prompts = throughput_workload(llm.model.config.vocab_size, num_requests, min_prompt,
                                  max_prompt)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    before = num_compiles("paged_step")
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    first = time.perf_counter()
    compiles = num_compiles("paged_step") - before
    llm.reset_prefix_cache()
    llm.generate(requests, sampling, use_tqdm=False)
    return dict(load_seconds=loaded - start, first_seconds=first - start,
                second_call_seconds=time.perf_counter() - first,
                num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
                num_compiles=compiles)


def hf_first_call(model_path: str, dtype: str, num_requests: int, min_prompt: int,
                  max_prompt: int, max_tokens: int, start: float) -> dict:
    """For bench --first-call, in a fresh process: transformers' load, then its static padded
    generate of the workload twice."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model, device = load_torch_model(model_path, dtype)
    loaded = time.perf_counter()
    prompts = throughput_workload(model.config.vocab_size, num_requests, min_prompt, max_prompt)
    run = hf_static_runner(model, device, prompts, max_tokens)
    first_result = run()
    first = time.perf_counter()
    second = run()
    return dict(load_seconds=loaded - start, first_seconds=first - start,
                second_call_seconds=second.seconds,
                num_output_tokens=first_result.num_output_tokens)
