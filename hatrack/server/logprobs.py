"""Token log probabilities in OpenAI's two response shapes.

chat:         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
completions:  {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}

A token's text is its own bytes decoded as UTF-8 (a token holding half a character
shows U+FFFD there; `bytes` is exact). Values come from the engine: log_softmax of the
model's own logits, adapter applied, before any sampling knob (see engine/sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: which character stands for which byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """Text and exact bytes of single tokens, cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_level_decoder()
        if isinstance(piece, str) and piece and all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int  # characters of the answer before this token's text


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text, raw = texts.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """The completions shape; each top_logprobs dict also holds the picked token (so up
    to logprobs + 1 entries), as OpenAI's does."""
    tops = []
    for e in entries:
        top = {texts.get(t)[0]: v for t, v in e.top}
        top.setdefault(texts.get(e.token_id)[0], e.logprob)
        tops.append(top)
    return {"tokens": [texts.get(e.token_id)[0] for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.offset for e in entries]}
