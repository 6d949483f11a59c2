"""The engine's plain data: request parameters, adapter specs, events and stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from hatrack.server.engine.lora import LoraWeights


class TokenConstraint(Protocol):
    """A per-row rule on which token may come next (a grammar, a fixed answer...).
    The engine builds one per row at admission, masks that row's logits with
    allowed_mask before anything else, calls accept with every token it picks for
    the row, and ends the row with finish_reason "stop" once is_done()."""

    def allowed_mask(self, vocab_size: int) -> "torch.Tensor | None":
        """bool [vocab_size], True = may come next; None = anything may."""
        ...

    def accept(self, token_id: int) -> None: ...

    def is_done(self) -> bool: ...


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same adapter -> same tokens (row i of n: seed + i)
    stop_token_ids: tuple[int, ...] = ()  # generation ends on any of these; they are not returned
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # vLLM's: divides (>0) or multiplies (<0) logits of prompt and generated tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k >= 0: the picked token's logprob and the k most likely
    n: int = 1  # rows generated from one prefill, each with its own handle and generator
    constraint: "Callable[[], TokenConstraint] | None" = None  # a factory: one constraint per row


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
    # with SamplingParams.logprobs: the token's log probability under the model's own
    # (adapter-applied) logits, and the most likely tokens as (id, logprob), best first
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


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
    decode_seconds: float = 0.0  # time spent in decode steps (prompts prefilled in them included)
    fused_steps: int = 0  # decode steps that also prefilled new prompts, in the same forward
    prefix_cache_hits: int = 0  # prompts that started from a cached prefix
    prefix_cache_tokens: int = 0  # prompt tokens taken from cached prefixes instead of prefilled
    shared_prompts: int = 0  # prompts that copied another running request's prefill of the same prompt
