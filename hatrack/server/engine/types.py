"""The engine's plain data: request parameters, adapter specs, events and stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from hatrack.server.engine.lora import LoraWeights


class TokenConstraint(Protocol):
    def allowed_mask(self, vocab_size: int) -> "torch.Tensor | None": ...  # bool [vocab_size], True = allowed next; None = anything
    def accept(self, token_id: int) -> None: ...   # the engine calls this with every token it picks for the row
    def is_done(self) -> bool: ...                  # True once the grammar is complete: the engine ends the row with finish_reason "stop"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same adapter -> same tokens
    stop_token_ids: tuple[int, ...] = ()  # generation ends on any of these; they are not returned
    constraint: Callable[[], TokenConstraint] | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter a request wants. `key` names its content (two specs with one key are
    the same adapter); `load` reads it from disk and may be slow: the engine calls it on a
    loader thread, once per key however many requests want it at the same time."""

    key: str
    load: Callable[[], "LoraWeights"] = field(compare=False, repr=False)


@dataclass
class TokenEvent:
    token_id: int | None  # None on the final event if nothing new
    finish_reason: str | None = None  # None while running; "stop" | "length" | "cancelled" | "error"
    error: BaseException | None = None


@dataclass
class EngineStats:
    queue_depth: int  # requests submitted and not yet running
    running: int  # sequences in the decode batch
    loaded_adapters: list[str]  # keys of the adapters in device slots, most recently used last
    adapter_load_seconds: list[float]  # recent `load` durations (disk + checks), oldest first
    steps: int  # decode steps run
    tokens_generated: int  # tokens sampled, first tokens from prefill included
    host_adapters: list[str] = field(default_factory=list)  # keys held in host memory
    adapter_loads_total: int = 0  # loads since start (adapter_load_seconds keeps the last 64)
    prefill_tokens: int = 0  # prompt tokens prefilled
    prefill_seconds: float = 0.0  # time spent prefilling (first tokens included)
    decode_seconds: float = 0.0  # time spent in decode steps
