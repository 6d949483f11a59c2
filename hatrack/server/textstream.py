"""Turns the engine's token ids into text deltas, honouring stop sequences.

Text is decoded from all ids so far (tokenizers merge bytes across tokens), and a
delta is released only when it cannot still turn into a stop sequence or is not
half of a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextStream:
    tokenizer: object
    stops: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already released
    stopped: bool = False

    def push(self, token_id: int | None) -> str:
        """Add a token; return the text that can be released now ('' if none)."""
        if token_id is not None and not self.stopped:
            self.ids.append(token_id)
        text = self._text()
        for stop in self.stops:
            at = text.find(stop)
            if at != -1:
                self.stopped = True
                return self._release(text[:at])
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for stop in self.stops:
            # hold back any tail that is the start of a stop sequence
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._release(text[:safe])

    def finish(self) -> str:
        """At the end: release whatever is held back (unless a stop sequence ended it)."""
        if self.stopped:
            return ""
        return self._release(self._text())

    def full_text(self) -> str:
        return self._text()[: self.sent] if self.stopped else self._text()

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _release(self, upto: str) -> str:
        if len(upto) <= self.sent:
            return ""
        delta = upto[self.sent :]
        self.sent = len(upto)
        return delta
