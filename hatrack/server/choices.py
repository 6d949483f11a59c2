"""One answer choice of a completion request, built from its engine events: text with
stop sequences honoured, token count, finish reason, and the logprob entries that go
with each released piece of text. Plus the merge of n choices' event streams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from hatrack.server.engine import TokenEvent
from hatrack.server.logprobs import TokenLogprob
from hatrack.server.textstream import TextStream


@dataclass
class Piece:
    """What one event releases: text and the logprob entries of the tokens it holds."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ended: bool = False  # this event ended the choice (later events of it are ignored)


class Choice:
    def __init__(self, index: int, tokenizer, stops: list[str], handle) -> None:
        self.index = index
        self.handle = handle
        self.stream = TextStream(tokenizer, stops)
        self.count = 0  # tokens generated (usage), up to a stop sequence
        self.finish: str | None = None  # the OpenAI finish_reason once ended
        self.failed = False
        self.cumulative = 0.0  # sum of the kept tokens' logprobs (best_of ranks by it)
        self.kept: list[TokenLogprob] = []  # entries released so far
        self._pending: list[TokenLogprob] = []
        self._text: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def push(self, event: TokenEvent) -> Piece:
        """Take one event; what it releases. Sets `finish` when the choice ends."""
        if self.finish is not None:
            return Piece()
        if event.error is not None:
            self.failed, self.finish = True, "error"
            return Piece(ended=True)
        text = ""
        if event.token_id is not None:
            self.count += 1
            if event.logprob is not None:
                top = tuple((t, _finite(v)) for t, v in event.top_logprobs or ())
                self._pending.append(TokenLogprob(event.token_id, _finite(event.logprob), top,
                                                  self.stream.decoded))
            text = self.stream.push(event.token_id)
            if self.stream.stopped:
                self.handle.cancel()  # a stop sequence ended it: free the row now
                self.finish = "stop"
        if event.finish_reason is not None and self.finish is None:
            self.finish = "length" if event.finish_reason == "length" else "stop"
        if self.finish is not None:
            text += self.stream.finish()
        return self._release(text)

    def _release(self, text: str) -> Piece:
        # a token goes out with the text it starts in; after a stop sequence, only the
        # tokens that start before the cut count
        if self.stream.cut is not None:
            upto = self.stream.cut
        elif self.finish is not None:
            upto = None
        else:
            upto = self.stream.sent
        out = [e for e in self._pending if upto is None or e.offset < upto]
        if self.finish is not None:
            self._pending = []
        else:
            self._pending = self._pending[len(out):]
        self.kept.extend(out)
        self.cumulative += sum(e.logprob for e in out)
        self._text.append(text)
        return Piece(text, out, self.finish is not None)


def _finite(logprob: float) -> float:
    """JSON has no -Infinity: a token the model rules out reads -9999 (as vLLM's)."""
    return max(logprob, -9999.0)


async def merged(handles, firsts: list[TokenEvent | None], iters) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from every choice's stream as they come, each ending at
    its final event."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        event = firsts[i]
        while event is not None:
            await queue.put((i, event))
            if event.finish_reason is not None:
                break
            event = await next_event(iters[i])
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(handles))]
    left = len(handles)
    try:
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def next_event(events) -> TokenEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
