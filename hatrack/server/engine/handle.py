"""RequestHandle: what submit() returns; events flow from the scheduler thread to a
blocking reader (result) or an asyncio consumer (async for)."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

from hatrack.server.engine.types import TokenEvent


class RequestHandle:
    def __init__(self, request_id: str, prompt_tokens: int, on_cancel: Callable[[], None]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._events: list[TokenEvent] = []
        self._tokens: list[int] = []
        self._finish: str | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.cancelled = False

    # ------------------------------------------------------------ consumer side

    def cancel(self) -> None:
        """Ask the engine to drop this request; its batch row and cache row are freed
        at the next step and the final event has finish_reason "cancelled"."""
        if not self._done.is_set() and not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    @property
    def tokens(self) -> list[int]:
        """Tokens generated so far (stop tokens are not included)."""
        with self._lock:
            return list(self._tokens)

    @property
    def events(self) -> list[TokenEvent]:
        """Every event so far, in order (logprobs ride on them)."""
        with self._lock:
            return list(self._events)

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """Block until the request ends: (token ids, finish_reason). Raises the request's
        error if it failed, TimeoutError if `timeout` passes first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return list(self._tokens), self._finish or "stop"

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """TokenEvents on the running event loop, from the first one (events produced
        before iteration began are replayed). Leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for event in self._events:
                queue.put_nowait(event)
            self._listeners.append((loop, queue))
        return self._iterate(queue)

    async def _iterate(self, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not self._done.is_set():  # consumer went away (client disconnect, stop string)
                self.cancel()

    # ------------------------------------------------------------ engine side

    def emit(self, event: TokenEvent) -> None:
        """Deliver an event to every reader (called by the engine's scheduler thread);
        nothing after the final event."""
        with self._lock:
            if self._finish is not None:
                return
            self._events.append(event)
            if event.token_id is not None:
                self._tokens.append(event.token_id)
            if event.finish_reason is not None:
                self._finish = event.finish_reason
                self._error = event.error
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that event loop is closed: nobody is listening there
                pass
        if event.finish_reason is not None:
            self._done.set()
