"""`folojax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncEngine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events), POST /tokenize, POST /detokenize, GET /health, GET /version, GET /metrics.
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}; a bad request never
reaches the engine. With an API key, every path but /health and /metrics needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import fastapi
import pydantic
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

import folojax
from folojax.entrypoints.async_engine import AsyncEngine, EngineDeadError
from folojax.entrypoints.openai import protocol
from folojax.entrypoints.openai.metrics import ServerMetrics
from folojax.entrypoints.openai.streaming import TextStream
from folojax.outputs import CompletionOutput, RequestOutput
from folojax.tokenizer import apply_chat_template

OPEN_PATHS = ("/health", "/metrics")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class APIKeyMiddleware:
    """401 for a request without `Authorization: Bearer KEY`, except on OPEN_PATHS. Plain ASGI
    (not BaseHTTPMiddleware, which hides a client's disconnect from the handlers)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                    "authentication_error", code="invalid_api_key").response()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None
              ) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="folojax", version=folojax.__version__)
    metrics = ServerMetrics(engine)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_, error: EngineDeadError):
        return APIError(503, str(error), "server_error").response()

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def _validation_error(_, error):
        return APIError(400, str(error)).response()

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": folojax.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return fastapi.Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": created,
            "owned_by": "folojax", "max_model_len": engine.engine.config.max_model_len}]}

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{served_model_name!r}", "not_found_error", "model",
                           "model_not_found")

    def require_tokenizer(what: str):
        if engine.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this model was loaded without one")
        return engine.tokenizer

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await parse_body(request, protocol.CompletionRequest,
                                protocol.UNSUPPORTED_COMPLETION_FIELDS)
        check_model(body.model)
        if body.echo and body.stream:
            raise APIError(400, "echo with stream is not supported", param="echo")
        sampling = to_sampling(body, body.max_tokens, body.logprobs)
        prompts = completion_prompts(body.prompt)
        prompts = [(text, ids if ids is not None else tokenize(text)) for text, ids in prompts]
        return await serve(request, "cmpl", prompts, sampling, body, CompletionFormat(
            engine.tokenizer, served_model_name, sampling.logprobs, body.echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await parse_body(request, protocol.ChatCompletionRequest,
                                protocol.UNSUPPORTED_CHAT_FIELDS)
        check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
        max_tokens = (body.max_tokens if body.max_completion_tokens is None
                      else body.max_completion_tokens)
        try:
            logprobs = body.engine_logprobs()
        except ValueError as error:
            raise APIError(400, str(error), param="top_logprobs") from None
        sampling = to_sampling(body, max_tokens, logprobs)
        ids = chat_prompt(body.messages)
        return await serve(request, "chatcmpl", [(None, ids)], sampling, body,
                           ChatFormat(engine.tokenizer, served_model_name, sampling.logprobs))

    @app.post("/tokenize")
    async def tokenize_endpoint(request: fastapi.Request):
        body = await parse_body(request, protocol.TokenizeRequest, ())
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give prompt or messages (one of them)", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(body.messages, body.add_generation_prompt)
        else:
            ids = require_tokenizer("tokenize")(
                body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"tokens": ids, "count": len(ids),
                "max_model_len": engine.engine.config.max_model_len}

    @app.post("/detokenize")
    async def detokenize_endpoint(request: fastapi.Request):
        body = await parse_body(request, protocol.DetokenizeRequest, ())
        check_model(body.model)
        vocab_size = engine.engine.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"tokens has ids outside [0, {vocab_size}): {bad[:5]}",
                           param="tokens")
        return {"prompt": require_tokenizer("detokenize").decode(body.tokens)}

    def tokenize(text: str) -> list[int]:
        return require_tokenizer("a text prompt")(text).input_ids

    def chat_prompt(messages, add_generation_prompt: bool = True) -> list[int]:
        tokenizer = require_tokenizer("chat")
        conversation = [m.model_dump(exclude_none=True) for m in messages]
        try:
            return apply_chat_template(tokenizer, conversation, add_generation_prompt)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error), param="messages") from None

    async def serve(request: fastapi.Request, prefix: str, prompts, sampling, body, fmt):
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        streams = [engine.generate(request_id, ids, sampling, prompt=text)
                   for request_id, (text, ids) in zip(request_ids, prompts, strict=True)]
        # Start every prompt's stream (the engine validates it) before answering anything.
        firsts = []
        try:
            for stream in streams:
                firsts.append(asyncio.ensure_future(anext(stream)))
            await asyncio.wait(firsts, return_when=asyncio.ALL_COMPLETED)
            for first in firsts:
                first.result()
        except BaseException as error:
            await close_all(streams, firsts)
            if isinstance(error, (ValueError, TypeError)):  # the engine rejected a prompt
                raise APIError(400, str(error)) from None
            raise
        histories = [metrics.track(ids, sampling.n) for _, ids in prompts]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(stream_events(
                response_id, streams, firsts, sampling, fmt, include_usage, histories), sep="\n")
        return await respond(request, response_id, prompts, streams, firsts, fmt, histories)

    async def respond(request, response_id, prompts, streams, firsts, fmt, histories):
        async def last_output(stream, first, history):
            output = first.result()
            history.update(output)
            while not output.finished:
                output = await anext(stream)
                history.update(output)
            return output

        work = asyncio.ensure_future(asyncio.gather(*(
            last_output(s, f, h) for s, f, h in zip(streams, firsts, histories, strict=True))))
        while not work.done():  # a client that goes away aborts its requests at once
            done, _ = await asyncio.wait([work], timeout=0.25)
            if not done and await request.is_disconnected():
                for history in histories:
                    history.aborted()
                await close_all(streams, [work])
                return fastapi.Response(status_code=499)
        outputs = work.result()
        choices = [fmt.choice(index * len(out.outputs) + c.index, c, out, prompts[index][0])
                   for index, out in enumerate(outputs) for c in out.outputs]
        choices.sort(key=lambda choice: choice["index"])
        return {"id": response_id, "object": fmt.object, "created": int(time.time()),
                "model": served_model_name, "choices": choices, "usage": usage(outputs)}

    async def stream_events(response_id, streams, firsts, sampling, fmt, include_usage,
                            histories):
        created = int(time.time())
        texts = {}
        outputs: list[RequestOutput | None] = [None] * len(streams)
        pending = {first: index for index, first in enumerate(firsts)}  # done already
        try:
            if fmt.object == "chat.completion":
                for c in range(sampling.n):
                    yield json.dumps(fmt.chunk(response_id, created, c, {"role": "assistant",
                                                                        "content": ""}))
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = pending.pop(task)
                    output = task.result()
                    outputs[index] = output
                    histories[index].update(output)
                    for completion in output.outputs:
                        number = index * sampling.n + completion.index
                        text = texts.setdefault(number, TextStream(sampling.stop))
                        delta = text.delta(completion.text, completion.finished)
                        token_ids = text.new_token_ids(completion.token_ids)
                        if delta or completion.finished or token_ids:
                            # the logprobs of the tokens new since the last chunk
                            steps = (completion.logprobs[len(completion.logprobs)
                                                         - len(token_ids):]
                                     if completion.logprobs is not None else None)
                            yield json.dumps(fmt.stream_choice(
                                response_id, created, number, delta, completion,
                                fmt.logprobs(token_ids, steps)))
                    if not output.finished:
                        pending[asyncio.ensure_future(anext(streams[index]))] = index
            if include_usage:
                yield json.dumps({"id": response_id, "object": fmt.chunk_object,
                                  "created": created, "model": served_model_name,
                                  "choices": [], "usage": usage(outputs)})
            yield "[DONE]"
        except EngineDeadError as error:
            yield json.dumps(APIError(503, str(error), "server_error").body())
        finally:  # the client went away, or an error: abort what still runs
            for history in histories:
                history.aborted()  # those not finished (before an await a cancel may cut)
            await close_all(streams, list(pending))

    def usage(outputs: list[RequestOutput]) -> dict:
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    return app


async def close_all(streams, tasks) -> None:
    """Cancels the tasks reading the streams (and waits for them to stop), then closes every
    stream: one whose request has not finished aborts it."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.aclose()


async def parse_body(request: fastapi.Request, model: type[pydantic.BaseModel],
                     unsupported: tuple[str, ...]):
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object")
    for field in unsupported:
        if field in raw:
            raise APIError(400, f"{field!r} is a field of the OpenAI API that folojax does not "
                                "support", param=field, code="unsupported_field")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = f"{field}: {first['msg']}"
        raise APIError(400, message, param=field) from None


def to_sampling(body, max_tokens, logprobs):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except (ValueError, TypeError) as error:
        field = str(error).split(" ")[0].removeprefix("SamplingParams.")
        raise APIError(400, str(error), param=field) from None


def completion_prompts(prompt) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) per prompt: a string, a list of strings, ids, or a list of id lists."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    return [(None, list(p)) for p in prompt]


def top_logprobs(step: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    """The step's num_top most likely (token id, logprob) pairs (the engine's step also holds the
    chosen token's)."""
    return sorted(step.items(), key=lambda item: -item[1])[:num_top]


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokenizer, model_name: str, num_top: int | None, echo: bool):
        self.tokenizer, self.model_name, self.num_top, self.echo = (
            tokenizer, model_name, num_top, echo)

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)

    def choice(self, index: int, completion: CompletionOutput, output: RequestOutput,
               prompt_text: str | None) -> dict:
        text = completion.text
        if self.echo:
            if prompt_text is None:
                prompt_text = (self.tokenizer.decode(output.prompt_token_ids)
                               if self.tokenizer else "")
            text = prompt_text + text
        return {"index": index, "text": text,
                "logprobs": self.logprobs(completion.token_ids, completion.logprobs),
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def stream_choice(self, response_id: str, created: int, index: int, delta: str,
                      completion: CompletionOutput, logprobs: dict | None) -> dict:
        return {"id": response_id, "object": self.chunk_object, "created": created,
                "model": self.model_name, "choices": [{
                    "index": index, "text": delta, "logprobs": logprobs,
                    "finish_reason": completion.finish_reason,
                    "stop_reason": completion.stop_reason}]}

    def logprobs(self, token_ids: list[int], logprobs) -> dict | None:
        if logprobs is None:
            return None
        tokens = [self._token(t) for t in token_ids]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens,
                "token_logprobs": [step[t] for t, step in zip(token_ids, logprobs, strict=True)],
                "top_logprobs": [{self._token(i): v for i, v in top_logprobs(step, self.num_top)}
                                 for step in logprobs],
                "text_offset": offsets}


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer, model_name: str, num_top: int | None):
        self.tokenizer, self.model_name, self.num_top = tokenizer, model_name, num_top

    def choice(self, index: int, completion: CompletionOutput, output: RequestOutput,
               prompt_text: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self.logprobs(completion.token_ids, completion.logprobs),
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def chunk(self, response_id: str, created: int, index: int, delta: dict,
              finish_reason=None, stop_reason=None, logprobs: dict | None = None) -> dict:
        return {"id": response_id, "object": self.chunk_object, "created": created,
                "model": self.model_name, "choices": [{
                    "index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason, "stop_reason": stop_reason}]}

    def stream_choice(self, response_id: str, created: int, index: int, delta: str,
                      completion: CompletionOutput, logprobs: dict | None) -> dict:
        return self.chunk(response_id, created, index, {"content": delta} if delta else {},
                          completion.finish_reason, completion.stop_reason, logprobs)

    def logprobs(self, token_ids: list[int], logprobs) -> dict | None:
        if logprobs is None:
            return None
        return {"content": [
            {**self._entry(token_id, step[token_id]),
             "top_logprobs": [self._entry(i, v) for i, v in top_logprobs(step, self.num_top)]}
            for token_id, step in zip(token_ids, logprobs, strict=True)]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def run_server(llm, host: str, port: int, served_model_name: str,
               api_key: str | None = None, log_level: str = "info") -> None:
    """Serves `llm` (a folojax.LLM) until interrupted."""
    import uvicorn

    engine = AsyncEngine(llm.llm_engine)
    try:
        uvicorn.run(build_app(engine, served_model_name, api_key), host=host, port=port,
                    log_level=log_level)
    finally:
        engine.shutdown()
