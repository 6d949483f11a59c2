"""Turns the engine's token ids into text deltas, honouring stop sequences.

Decoding is incremental and costs the same at the 4,000th token as at the first:
each new token is decoded in a small window of recent ids, after the ids whose text is
already out (the windowed decode vLLM uses). A window's text is taken only when it does
not end in half a multi-byte character (U+FFFD), so a character split over byte-level
tokens comes out whole. Concatenated, the deltas are `tokenizer.decode(ids,
skip_special_tokens=True)`.

A delta is released only when it cannot still turn into a stop sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_PARTIAL = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


@dataclass
class IncrementalDecoder:
    """Text of a growing list of ids, one token at a time, in windows."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the window: ids before it are never decoded again
    read_offset: int = 0  # ids before it have their text out

    def step(self, token_id: int) -> str:
        """Add a token; return the new complete text ('' while a character is split)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(_PARTIAL):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever the held ids decode to, incomplete characters included."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


@dataclass
class TextStream:
    tokenizer: object
    stops: list[str] = field(default_factory=list)
    sent: int = 0  # characters of the text already released
    stopped: bool = False
    decoded: int = 0  # characters decoded so far (where the next token's text starts)
    cut: int | None = None  # where a stop sequence cut the text
    _released: list[str] = field(default_factory=list)
    _held: str = ""  # decoded, not released: it may still become a stop sequence
    _decoder: IncrementalDecoder | None = None

    def __post_init__(self) -> None:
        self._decoder = IncrementalDecoder(self.tokenizer)
        self.stops = [s for s in (self.stops or []) if s]

    @property
    def ids(self) -> list[int]:
        return self._decoder.ids

    def push(self, token_id: int | None) -> str:
        """Add a token; return the text that can be released now ('' if none)."""
        if self.stopped:
            return ""
        if token_id is not None:
            piece = self._decoder.step(token_id)
            self.decoded += len(piece)
            self._held += piece
        if self._cut_at_stop():
            return self._release(len(self._held))
        return self._release(self._safe())

    def finish(self) -> str:
        """At the end: release whatever is held back (unless a stop sequence ended it)."""
        if self.stopped:
            return ""
        piece = self._decoder.flush()
        self.decoded += len(piece)
        self._held += piece
        self._cut_at_stop()
        return self._release(len(self._held))

    def full_text(self) -> str:
        return "".join(self._released) + ("" if self.stopped else self._held)

    def _cut_at_stop(self) -> bool:
        """A stop sequence can only start in the held text (released text never ends in
        the start of one); cut there and stop."""
        cuts = [at for at in (self._held.find(stop) for stop in self.stops) if at != -1]
        if cuts:
            self._held = self._held[: min(cuts)]
            self.cut = self.sent + min(cuts)
            self.stopped = True
        return self.stopped

    def _safe(self) -> int:
        """How much of the held text cannot be the start of a stop sequence."""
        held = self._held
        safe = len(held)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(held)), 0, -1):
                if held.endswith(stop[:k]):
                    safe = min(safe, len(held) - k)
                    break
        return safe

    def _release(self, upto: int) -> str:
        if upto <= 0:
            return ""
        delta, self._held = self._held[:upto], self._held[upto:]
        self._released.append(delta)
        self.sent += len(delta)
        return delta
