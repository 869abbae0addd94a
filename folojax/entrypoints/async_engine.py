"""AsyncEngine: LLMEngine behind an asyncio API, for the server. The engine steps in a thread
of its own, so the event loop never waits for a device step; every request gets its own stream of
outputs, and a request added while steps run joins the next step (continuous batching).

All engine calls happen on the engine thread: requests and aborts from the event loop are queued
to it and applied between steps, and outputs come back through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from folojax.engine.llm_engine import LLMEngine
from folojax.outputs import RequestOutput
from folojax.sampling_params import SamplingParams

logger = logging.getLogger("folojax")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (an error in a step); no request can run any more."""


@dataclasses.dataclass
class EngineStats:
    """A snapshot for /metrics, taken on the engine thread after a step."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the pool's blocks in use


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue  # RequestOutput, or an exception that ends the stream


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput]], None]
                 | None = None):
        """on_step (optional): called on the engine thread with each step's outputs."""
        self.engine = engine
        self.on_step = on_step
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="folojax-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingParams, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Adds the request; yields its cumulative output after each step that advanced it, the
        last one finished. Raises the engine's ValueError / TypeError for a request it rejects.
        A generator closed early (the client went away) aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        added = loop.create_future()
        self._post(("add", request_id, prompt_token_ids, sampling, prompt, stream, added))
        await added  # raises what add_request raised
        finished = False
        try:
            while True:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops the request at the next step boundary; its blocks return to the pool."""
        self._post(("abort", request_id))

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._update_stats()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._update_stats()
                if self.on_step is not None:
                    self.on_step(outputs)
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        if output.finished:
                            del self._streams[output.request_id]
                        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, output)
        except BaseException as error:  # the engine is unusable: fail every stream
            logger.exception("the engine loop stopped")
            self._error = error
            dead = EngineDeadError(f"the engine loop stopped: {error!r}")
            for stream in self._streams.values():
                stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, dead)
            self._streams.clear()
            self._fail_pending_adds(dead)

    def _queued_commands(self):
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply_commands(self) -> None:
        for command in self._queued_commands():
            if command[0] == "add":
                _, request_id, ids, sampling, prompt, stream, added = command
                try:
                    self.engine.add_request(request_id, ids, sampling, prompt=prompt)
                except Exception as error:  # rejected: nothing was queued
                    stream.loop.call_soon_threadsafe(_settle, added, error)
                    continue
                self._streams[request_id] = stream
                stream.loop.call_soon_threadsafe(_settle, added, None)
            else:
                _, request_id = command
                self._streams.pop(request_id, None)
                self.engine.abort_request(request_id)

    def _fail_pending_adds(self, error: BaseException) -> None:
        for command in self._queued_commands():
            if command[0] == "add":
                stream, added = command[5], command[6]
                stream.loop.call_soon_threadsafe(_settle, added, error)

    def _update_stats(self) -> None:
        scheduler = self.engine.scheduler
        pool = self.engine.kv_cache_manager.pool
        self.stats = EngineStats(num_requests_running=len(scheduler.running),
                                 num_requests_waiting=len(scheduler.waiting),
                                 kv_cache_usage=1.0 - pool.num_free_blocks / pool.num_blocks)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
