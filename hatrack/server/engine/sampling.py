"""Choosing each row's next token, and the log probabilities a row asked for.

Rows that ask for nothing beyond temperature and top_p take today's path: one argmax
over the whole batch, then temperature + top-p with the row's own generator for the
sampled ones. Only rows with a knob (a constraint, logit_bias, a penalty, or top_k /
min_p while sampling) have their logits processed, in fp32 and vectorised over those
rows, in this order:

    constraint mask -> logit_bias -> repetition, frequency, presence penalties
    -> temperature -> top_k, min_p, top_p -> argmax (greedy) or a draw

Logprobs are log_softmax in fp32 of the row's raw logits (its adapter applied, before
any of the processing above), as OpenAI and vLLM report them: what the model thinks,
whatever the knobs then did with it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from hatrack.server.engine.errors import InvalidRequestError
from hatrack.server.engine.types import SamplingParams, TokenConstraint

log = logging.getLogger("hatrack.engine")

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / 1e-300 overflows float32)
MIN_TOP_P = 1e-6  # float32 rounds a smaller top_p to 0, which would keep no token at all
# a logit divided by less overflows float32 (and float32 rounds 5e-324 to 0): NaN answers
MIN_REPETITION_PENALTY = 1e-3

# (the picked token's logprob, the most likely tokens as (id, logprob), best first)
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


def make_generator(params: SamplingParams, device: torch.device, index: int = 0) -> torch.Generator | None:
    """The row's own generator (None when greedy). Choice `index` of a seeded request
    draws from seed + index, so each of n choices equals that seed's request alone."""
    if params.temperature < MIN_TEMPERATURE:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed + index if params.seed is not None else random.getrandbits(63))
    return generator


MAX_LOGPROBS = 20


def check_knobs(params: SamplingParams, vocab: int, max_rows: int) -> None:
    """InvalidRequestError naming the first knob out of its range."""
    def bad(name: str, want: str, got) -> InvalidRequestError:
        return InvalidRequestError(f"{name} must be {want}, got {got!r}")

    finite = lambda v: isinstance(v, (int, float)) and abs(v) < float("inf")  # noqa: E731
    if not isinstance(params.n, int) or not 1 <= params.n <= max_rows:
        raise bad("n", f"an integer from 1 to {max_rows} (the engine's batch)", params.n)
    if not isinstance(params.top_k, int) or params.top_k < -1:
        raise bad("top_k", "-1, 0 (all tokens) or a positive integer", params.top_k)
    if not (finite(params.min_p) and 0 <= params.min_p <= 1):
        raise bad("min_p", "in [0, 1]", params.min_p)
    for name in ("presence_penalty", "frequency_penalty"):
        if not (finite(getattr(params, name)) and -2 <= getattr(params, name) <= 2):
            raise bad(name, "in [-2, 2]", getattr(params, name))
    if not (finite(params.repetition_penalty) and MIN_REPETITION_PENALTY <= params.repetition_penalty <= 10):
        raise bad("repetition_penalty", f"in [{MIN_REPETITION_PENALTY}, 10]", params.repetition_penalty)
    for token, value in (params.logit_bias or {}).items():
        if not isinstance(token, int) or not 0 <= token < vocab:
            raise bad("logit_bias", f"keyed by token ids in 0..{vocab - 1}", token)
        if not (finite(value) and -100 <= value <= 100):
            raise bad("logit_bias", "values in [-100, 100]", value)
    if params.logprobs is not None and not (isinstance(params.logprobs, int)
                                            and 0 <= params.logprobs <= MAX_LOGPROBS):
        raise bad("logprobs", f"None or an integer from 0 to {MAX_LOGPROBS}", params.logprobs)


@dataclass(eq=False)
class RowSampler:
    """One sequence's sampling state: its generator, constraint and the token counts
    its penalties need (kept only for rows that have a penalty)."""

    params: SamplingParams
    generator: torch.Generator | None
    constraint: TokenConstraint | None = None
    counts: torch.Tensor | None = None  # [vocab] float32: times each token was generated
    in_prompt: torch.Tensor | None = None  # [vocab] bool: the repetition penalty's prompt tokens
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    knobs: bool = False  # takes the processed path rather than the plain one

    @classmethod
    def build(cls, params: SamplingParams, prompt: list[int], vocab: int, device: torch.device,
              index: int = 0) -> "RowSampler":
        row = cls(params, make_generator(params, device, index))
        if params.constraint is not None:
            row.constraint = params.constraint()
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            row.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if params.repetition_penalty != 1.0:
                row.in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
                row.in_prompt[torch.tensor(prompt, device=device)] = True
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            row.bias_ids = torch.tensor(ids, device=device)
            row.bias_values = torch.tensor([float(params.logit_bias[i]) for i in ids], device=device)
        sampled_filter = row.generator is not None and (params.top_k > 0 or params.min_p > 0)
        row.knobs = bool(row.constraint is not None or row.counts is not None or row.bias_ids is not None
                         or sampled_filter)
        return row

    def accept(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token)

    def done(self) -> bool:
        """The constraint is complete: the row ends here."""
        return self.constraint is not None and self.constraint.is_done()


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
               top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """The row's token as a 0-dim tensor on the logits' device: no host sync here, the
    caller reads every row's token back at once."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_p = max(top_p, MIN_TOP_P)
    if top_p < 1.0 or top_k > 0 or min_p > 0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        if top_k > 0:
            keep[top_k:] = False
        if min_p > 0:
            keep &= sorted_probs >= min_p * sorted_probs[0]
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return order[choice][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


def _process(x: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Constraint masks, biases and penalties applied to fp32 logits x [len(rows), vocab]."""
    vocab = x.shape[-1]
    for j, row in enumerate(rows):
        if row.constraint is not None:
            allowed = row.constraint.allowed_mask(vocab)
            if allowed is not None:
                allowed = allowed.to(x.device)
                if bool(allowed.any()):
                    x[j].masked_fill_(~allowed, float("-inf"))
                else:  # a constraint that allows nothing is a bug in it; do not make NaNs of the row
                    log.warning("a token constraint allowed no token; the row continues unconstrained")
        if row.bias_ids is not None:
            x[j].index_add_(0, row.bias_ids, row.bias_values)
    penalised = [j for j, row in enumerate(rows) if row.counts is not None]
    if penalised:
        ps = [rows[j].params for j in penalised]
        idx = torch.tensor(penalised, device=x.device)
        sub = x[idx]
        counts = torch.stack([rows[j].counts for j in penalised])
        seen = counts > 0
        rep = torch.tensor([p.repetition_penalty for p in ps], device=x.device)[:, None]
        in_prompt = [rows[j].in_prompt for j in penalised]
        if any(m is not None for m in in_prompt):
            seen_or_prompt = seen | torch.stack([m if m is not None else torch.zeros_like(seen[0])
                                                 for m in in_prompt])
            sub = torch.where(seen_or_prompt, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([p.frequency_penalty for p in ps], device=x.device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=x.device)[:, None]
        sub = sub - freq * counts - pres * seen.float()
        x[idx] = sub
    return x


def _logprobs(logits: torch.Tensor, rows: list[int], tokens: torch.Tensor,
              ks: list[int]) -> list[TokenLogprobs]:
    """tokens: every row's picked token, on the logits' device."""
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    index = torch.tensor(rows, device=lp.device)
    chosen = lp.gather(1, tokens[index][:, None])[:, 0].tolist()
    k = max(ks)
    if k:
        values, ids = lp.topk(k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    out = []
    for j, kj in enumerate(ks):
        top = tuple(zip(ids[j][:kj], values[j][:kj])) if kj else ()
        out.append((chosen[j], top))
    return out


def pick_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Next token per row of logits [rows, vocab], and the logprobs of the rows that
    asked for them. Every row's token is picked on the logits' device (one argmax for
    the plain greedy rows, a draw per sampled row with its own generator) and read back
    in one transfer: on CUDA a step waits for the device once, not once per row."""
    # bf16 -> fp32 is exact and torch's fp32 argmax is ~2x faster on CPU (same first maximum)
    tokens = (logits.float() if logits.dtype == torch.bfloat16 else logits).argmax(dim=-1)
    knob = [i for i, row in enumerate(rows) if row.knobs]
    if knob:
        index = torch.tensor(knob, device=logits.device)
        x = _process(logits[index].float(), [rows[i] for i in knob])
        picked = x.argmax(dim=-1)
        for j, i in enumerate(knob):
            row = rows[i]
            if row.generator is not None:
                p = row.params
                picked[j] = sample_one(x[j], p.temperature, p.top_p, row.generator, p.top_k, p.min_p)
        tokens[index] = picked
    for i, row in enumerate(rows):
        if row.generator is not None and not row.knobs:
            tokens[i] = sample_one(logits[i], row.params.temperature, row.params.top_p, row.generator)
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    want = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if want:
        for i, got in zip(want, _logprobs(logits, want, tokens, [rows[i].params.logprobs for i in want])):
            logprobs[i] = got
    return tokens.tolist(), logprobs
