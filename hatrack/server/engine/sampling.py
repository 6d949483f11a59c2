"""Choosing each row's next token: greedy, or temperature + top-p with a per-request generator."""

from __future__ import annotations

import random

import torch

from hatrack.server.engine.types import SamplingParams


MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / 1e-300 overflows float32)
MIN_TOP_P = 1e-6  # float32 rounds a smaller top_p to 0, which would keep no token at all


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature < MIN_TEMPERATURE:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return generator


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax().item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_p = max(top_p, MIN_TOP_P)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token per row of logits [rows, vocab]: one argmax for all rows, then the
    sampled rows one by one."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if g is not None:
            tokens[i] = sample_one(logits[i], p.temperature, p.top_p, g)
    return tokens
