"""`folojax serve` in a real process, through the official openai client: results equal LLM's,
streams equal non-streamed text, errors have OpenAI's shape, disconnects free their blocks."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

import folojax

API_KEY = "test-key"
MODEL = "smollm2"
GREEDY = dict(temperature=0, max_tokens=12)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colors are"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "folojax.cli", "serve", "--port", str(port), "--api-key", API_KEY,
         "--served-model-name", MODEL, "--max-model-len", "2048", "--max-num-seqs", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, FOLOJAX_API_KEY=""))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"folojax serve exited:\n{process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("folojax serve did not become healthy in 180 s")
    yield url
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    return float(re.search(rf"^folojax:{name} (\S+)$", text, re.M).group(1))


def _engine_text(llm, prompt, **sampling) -> str:
    [output] = llm.generate(prompt, folojax.SamplingParams(**sampling), use_tqdm=False)
    return output.outputs[0].text


def test_models_health_and_version_answer(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server}/version", headers=headers, timeout=10).json() == {
        "version": folojax.__version__}


def test_greedy_completions_equal_llm_generate(client, smollm2):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, **GREEDY)
    assert [c.index for c in response.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in response.choices] == [_engine_text(smollm2, p, **GREEDY)
                                                  for p in PROMPTS]
    tokenizer = smollm2.get_tokenizer()
    ids = tokenizer(PROMPTS[0]).input_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    [expected] = smollm2.generate({"prompt_token_ids": ids}, folojax.SamplingParams(**GREEDY),
                                  use_tqdm=False)
    assert by_ids.choices[0].text == response.choices[0].text == expected.outputs[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in PROMPTS)
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPTS[0] + response.choices[0].text


def test_chat_equals_llm_chat(client, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    [expected] = smollm2.chat(messages, folojax.SamplingParams(**GREEDY), use_tqdm=False)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    parts = [{"type": "text", "text": "What is the capital of France?"}]
    as_parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], **GREEDY)
    assert as_parts.choices[0].message.content == expected.outputs[0].text


def test_stream_deltas_concatenate_to_the_non_streamed_text(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    completion = client.completions.create(model=MODEL, prompt=PROMPTS[1], **GREEDY)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_a_stop_string_across_tokens_never_reaches_the_stream(client, smollm2):
    free = _engine_text(smollm2, PROMPTS[0], **GREEDY)
    words = free.split()
    stop = f"{words[1]} {words[2]}"  # spans at least two tokens
    assert stop in free
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=[stop], **GREEDY)
    assert whole.choices[0].text == free[:free.index(stop)]
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].stop_reason == stop
    deltas = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], stop=[stop], stream=True, **GREEDY)]
    # Text once streamed cannot be taken back: equal to the text before the stop string, the
    # deltas never held any of it.
    assert "".join(deltas) == whole.choices[0].text


def test_seeded_n2_sampling_reproduces_the_engine(client, smollm2):
    sampling = dict(n=2, seed=7, temperature=0.9, max_tokens=10)
    first = client.completions.create(model=MODEL, prompt=PROMPTS[2], **sampling)
    again = client.completions.create(model=MODEL, prompt=PROMPTS[2], **sampling)
    [expected] = smollm2.generate(PROMPTS[2], folojax.SamplingParams(**sampling), use_tqdm=False)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in expected.outputs]


def test_logprobs_equal_the_engines(client, smollm2):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=3, **GREEDY)
    [expected] = smollm2.generate(PROMPTS[0], folojax.SamplingParams(logprobs=3, **GREEDY),
                                  use_tqdm=False)
    completion = expected.outputs[0]
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(
        [step[t] for t, step in zip(completion.token_ids, completion.logprobs, strict=True)],
        abs=1e-6)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
        top_logprobs=2, **GREEDY)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    streamed = [entry for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
        top_logprobs=2, stream=True, **GREEDY) if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [
        (e.token, e.logprob) for e in chat.choices[0].logprobs.content]


def test_each_error_has_openais_shape_and_the_engine_keeps_serving(server, client):
    cases = [
        (openai.BadRequestError, "temperature", dict(prompt="x", temperature=-1)),
        (openai.BadRequestError, "unknown field 'foo'", dict(prompt="x",
                                                             extra_body={"foo": 1})),
        (openai.BadRequestError, "'user' is a field of the OpenAI API that folojax does not",
         dict(prompt="x", user="someone")),
        (openai.BadRequestError, "has 3000 tokens but max_model_len leaves room for 2048",
         dict(prompt=[5] * 3000)),
        (openai.BadRequestError, "logprobs=21 exceeds max_logprobs=20",
         dict(prompt="x", logprobs=21)),
    ]
    for error_type, message, fields in cases:
        with pytest.raises(error_type, match=re.escape(message)) as caught:
            client.completions.create(model=MODEL, max_tokens=2, **fields)
        assert set(caught.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="SamplingParams.max_tokens must be"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=0)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2, max_tokens=2)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # no key needed
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text


def _wait_until_idle(server: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (_metric(server, "num_requests_running")
                                           or _metric(server, "kv_cache_usage_perc")):
        time.sleep(0.2)
    assert _metric(server, "num_requests_running") == 0
    assert _metric(server, "kv_cache_usage_perc") == 0


def test_a_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "stream": True, **GREEDY}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_a_client_that_leaves_before_the_answer_aborts_its_request(server):
    # 1500 tokens take far longer than the bound below: only an abort ends it in time.
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=2)
    _wait_until_idle(server)


def _aborted(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    found = re.search(r'^folojax:request_success_total\{finished_reason="abort"\} (\S+)$', text,
                      re.M)
    return float(found.group(1)) if found else 0.0


def test_a_disconnected_stream_frees_its_request_and_blocks(server):
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    aborted = _aborted(server)
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert _metric(server, "num_requests_running") == 1
        assert _metric(server, "kv_cache_usage_perc") > 0
    _wait_until_idle(server)
    assert _aborted(server) == aborted + 1  # counted as vLLM does
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'folojax:request_success_total{finished_reason="length"}' in text
    assert "folojax:time_to_first_token_seconds_count" in text


def test_16_concurrent_streams_each_give_what_they_give_alone(server, smollm2):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(16)]
    expected = [_engine_text(smollm2, p, **GREEDY) for p in prompts]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0,
                                    timeout=120)

        async def one(prompt):
            stream = await client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                     **GREEDY)
            return "".join([chunk.choices[0].text async for chunk in stream])

        return await asyncio.wait_for(asyncio.gather(*map(one, prompts)), timeout=300)

    assert asyncio.run(run()) == expected


def test_tokenize_and_detokenize_round_trip(server, smollm2):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": PROMPTS[0]}, headers=headers,
                        timeout=10).json()
    assert tokens["tokens"] == smollm2.get_tokenizer()(PROMPTS[0]).input_ids
    assert tokens["count"] == len(tokens["tokens"])
    text = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]},
                      headers=headers, timeout=10).json()
    assert text == {"prompt": PROMPTS[0]}
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [10**9]}, headers=headers,
                     timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_bench_serve_loads_the_server_and_reports_latencies(server, capsys):
    from folojax.bench_serve import run_serve_bench
    from folojax.cli import main

    result = run_serve_bench(f"{server}/v1", MODEL, num_requests=6, prompt_words=8,
                             max_tokens=5, concurrency=3, api_key=API_KEY)
    summary = result.summary()
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert all(1 <= r.num_output_tokens <= 5 and len(r.itls) <= r.num_output_tokens - 1
               for r in result.requests)
    assert 0 < summary["ttft"]["p50"] <= summary["ttft"]["p99"]
    assert main(["bench", "serve", "--base-url", f"{server}/v1", "--api-key", API_KEY,
                 "--num-requests", "3", "--max-tokens", "3", "--prompt-words", "4",
                 "--request-rate", "50"]) == 0
    out = capsys.readouterr().out
    assert f"model={MODEL}" in out and "completed 3 requests (0 failed)" in out
    assert "TTFT ms p50 / p90 / p99" in out


def test_bench_serve_plots_latency_against_load(server, tmp_path, capsys):
    from folojax.cli import main

    path = tmp_path / "load.png"
    assert main(["bench", "serve", "--base-url", f"{server}/v1", "--api-key", API_KEY,
                 "--num-requests", "2", "--max-tokens", "2", "--prompt-words", "4",
                 "--concurrency", "2", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "concurrency 1:" in out and "concurrency 2:" in out and f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
