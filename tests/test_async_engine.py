"""AsyncEngine (entrypoints/async_engine.py): the engine steps in its own thread."""

import asyncio

import pytest
from fastapi.testclient import TestClient

import folojax
from folojax.entrypoints.async_engine import AsyncEngine, EngineDeadError
from folojax.entrypoints.openai.api_server import build_app
from folojax.entrypoints.openai.streaming import TextStream

GREEDY = folojax.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


async def _collect(engine, request_id, ids, sampling=GREEDY, delay=0.0):
    await asyncio.sleep(delay)
    outputs = [o async for o in engine.generate(request_id, ids, sampling)]
    return outputs


def test_requests_added_while_steps_run_each_get_their_own_stream(tiny_qwen3):
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
    engine = AsyncEngine(llm.llm_engine)
    try:
        async def run():
            return await asyncio.wait_for(asyncio.gather(*(
                _collect(engine, f"r{i}", p, delay=0.02 * i) for i, p in enumerate(prompts))),
                timeout=120)

        streams = asyncio.run(run())
    finally:
        engine.shutdown()
    for outputs, tokens in zip(streams, expected, strict=True):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == tokens
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths)  # cumulative


def test_a_rejected_request_raises_and_the_engine_keeps_serving(tiny_qwen3):
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")
    engine = AsyncEngine(llm.llm_engine)
    try:
        with pytest.raises(ValueError, match="invalid token ids"):
            asyncio.run(_collect(engine, "bad", [5, 10**6]))
        assert not llm.llm_engine.has_unfinished_requests()
        outputs = asyncio.run(asyncio.wait_for(_collect(engine, "good", [5, 6]), timeout=120))
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    finally:
        engine.shutdown()


def test_a_failing_step_stops_the_loop_and_health_says_so(tiny_qwen3, monkeypatch):
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32")

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.llm_engine, "step", broken_step)
    engine = AsyncEngine(llm.llm_engine)
    try:
        app = TestClient(build_app(engine, "tiny"))
        assert app.get("/health").status_code == 200
        with pytest.raises(EngineDeadError, match="device lost"):
            asyncio.run(asyncio.wait_for(_collect(engine, "r", [5, 6]), timeout=60))
        assert not engine.is_alive
        assert app.get("/health").status_code == 503
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(engine, "later", [5, 6]))
    finally:
        engine.shutdown()


def test_text_stream_holds_back_what_could_start_a_stop_string():
    stream = TextStream(["STOP"])
    assert stream.delta("Hello S", finished=False) == "Hell"  # "o S" could begin "STOP"
    assert stream.delta("Hello ST", finished=False) == "o"
    # The engine found the stop string and cut the text before it.
    assert stream.delta("Hello ", finished=True) == " "
    plain = TextStream([])
    assert plain.delta("ab", False) + plain.delta("abc", True) == "abc"
