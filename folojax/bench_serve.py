"""`folojax bench serve`: a load generator for any OpenAI-compatible server, in the style of
`vllm bench serve`. It sends N streaming /v1/completions requests, at a fixed concurrency or at
a Poisson rate, and reports request throughput, output tok/s, and TTFT, TPOT and ITL
percentiles. Prompts are random words (the same for every server, whatever its tokenizer);
decoding is greedy with a fixed max_tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point number group problem fact river mountain city garden letter music "
         "story window table market energy history science ocean forest winter morning").split()


@dataclasses.dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    num_output_tokens: int = 0
    itls: list[float] = dataclasses.field(default_factory=list)  # gaps between text chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)


@dataclasses.dataclass
class ServeBenchResult:
    seconds: float
    requests: list[RequestResult]

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.requests if r.ok]

    def summary(self) -> dict:
        done = self.completed
        tokens = sum(r.num_output_tokens for r in done)

        def percentiles(values):
            if not values:
                return {"p50": None, "p90": None, "p99": None}
            return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}

        return {
            "completed": len(done), "failed": len(self.requests) - len(done),
            "seconds": self.seconds, "requests_per_second": len(done) / self.seconds,
            "output_tokens": tokens, "output_tokens_per_second": tokens / self.seconds,
            "ttft": percentiles([r.ttft for r in done]),
            "tpot": percentiles([r.tpot for r in done if r.tpot is not None]),
            "itl": percentiles([gap for r in done for gap in r.itls]),
        }


def random_prompts(num_requests: int, num_words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, num_words)) for _ in range(num_requests)]


async def _one_request(client, url: str, headers: dict, body: dict) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    result.num_output_tokens = event["usage"]["completion_tokens"]
                if not any(choice.get("text") for choice in event.get("choices") or []):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
    except Exception as error:  # a failed request is counted, not fatal
        result.error = repr(error)
        return result
    result.e2e = time.perf_counter() - start
    result.num_output_tokens = result.num_output_tokens or chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "no text came back"
    return result


async def _run(base_url: str, model: str, prompts: list[str], max_tokens: int,
               concurrency: int | None, request_rate: float | None, api_key: str | None,
               timeout: float, seed: int, min_tokens: int | None) -> ServeBenchResult:
    import httpx

    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
            max_connections=concurrency or len(prompts))) as client:
        extra = {} if min_tokens is None else {"min_tokens": min_tokens}

        async def limited(prompt: str) -> RequestResult:
            async with limit:
                return await _one_request(client, url, headers, {
                    "model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **extra})

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if request_rate is not None:
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return ServeBenchResult(time.perf_counter() - start, list(results))


def run_serve_bench(base_url: str, model: str, num_requests: int = 64, prompt_words: int = 64,
                    max_tokens: int = 64, concurrency: int | None = 16,
                    request_rate: float | None = None, api_key: str | None = None,
                    timeout: float = 600.0, seed: int = 0, min_tokens: int | None = None
                    ) -> ServeBenchResult:
    """Sends the requests (a fixed concurrency, or Poisson arrivals at request_rate per second
    with no cap on concurrency when concurrency is None) and waits for all of them.
    min_tokens (a vLLM and llama.cpp extension): sent when given, so that every server
    generates the same number of tokens whatever its EOS."""
    if num_requests < 1 or prompt_words < 1 or max_tokens < 1:
        raise ValueError("num_requests, prompt_words and max_tokens must be positive")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be positive, got {concurrency}")
    if request_rate is not None and request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    prompts = random_prompts(num_requests, prompt_words, seed)
    return asyncio.run(_run(base_url, model, prompts, max_tokens, concurrency, request_rate,
                            api_key, timeout, seed, min_tokens))


def format_serve_bench(result: ServeBenchResult) -> str:
    s = result.summary()

    def ms(stats):
        return " / ".join("-" if stats[k] is None else f"{stats[k] * 1e3:.1f}"
                          for k in ("p50", "p90", "p99"))

    lines = [f"completed {s['completed']} requests ({s['failed']} failed) in {s['seconds']:.2f} s",
             f"request throughput {s['requests_per_second']:.2f} req/s, output "
             f"{s['output_tokens_per_second']:.1f} tok/s ({s['output_tokens']} tokens)",
             f"TTFT ms p50 / p90 / p99: {ms(s['ttft'])}",
             f"TPOT ms p50 / p90 / p99: {ms(s['tpot'])}",
             f"ITL  ms p50 / p90 / p99: {ms(s['itl'])}"]
    errors = [r.error for r in result.requests if not r.ok]
    if errors:
        lines.append(f"first error: {errors[0]}")
    return "\n".join(lines)


def plot_latency_against_load(points: list[tuple[int, ServeBenchResult]], path: str) -> None:
    """Draws p50 TTFT and TPOT against output tok/s, one point per concurrency, to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'folojax[bench]'") from None
    summaries = [(concurrency, result.summary()) for concurrency, result in points]
    throughput = [s["output_tokens_per_second"] for _, s in summaries]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("ttft", "tpot"), strict=True):
        values = [(s[metric]["p50"] or 0) * 1e3 for _, s in summaries]
        axis.plot(throughput, values, marker="o")
        for (concurrency, _), x, y in zip(summaries, throughput, values, strict=True):
            axis.annotate(f"c={concurrency}", (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel("output tok/s")
        axis.set_ylabel(f"{metric.upper()} p50 (ms)")
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
