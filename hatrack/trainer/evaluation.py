"""Scores of an adapter and of its base on the same rows.

Eval loss and perplexity are taken on the trained (answer) tokens only, exactly the
tokens the adapter was trained on. Rows that carry an expected answer are also
answered greedily, and scored by exact match (after normalising case, whitespace
and punctuation) and "contains" (the normalised expected answer appears in the
normalised generation).
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from dataclasses import dataclass
from typing import Callable

from hatrack.trainer.data import Example
from hatrack.trainer.distributed import Processes
from hatrack.trainer.render import IGNORE, Encoded, encode, render_prompt

MAX_NEW_TOKENS = 64
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class Scores:
    eval_loss: float
    perplexity: float
    exact_match: float | None = None
    contains: float | None = None
    loss_rows: int = 0  # rows with trained tokens: eval_loss and perplexity
    answer_rows: int = 0  # rows with an expected answer: exact_match and contains

    def as_dict(self) -> dict[str, float | None]:
        return {
            "eval_loss": self.eval_loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
            "contains": self.contains,
        }


def _autocast(model):
    import torch

    dtype = getattr(model, "dtype", torch.float32)
    device = next(model.parameters()).device.type
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device, dtype=dtype)
    return contextlib.nullcontext()


def eval_loss(model, encoded: list[Encoded], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over all trained tokens of `encoded`."""
    total, count = loss_sums(model, encoded, pad_id, batch_size)
    return total / count if count else float("nan")


def loss_sums(model, encoded: list[Encoded], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed cross-entropy, number of trained tokens) over `encoded`: sums, so the
    shares of several processes add up to the whole."""
    import torch

    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # little padding
    device = next(model.parameters()).device
    with torch.no_grad(), _autocast(model):
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, e in enumerate(batch):
                n = len(e.input_ids)
                ids[r, :n] = torch.tensor(e.input_ids)
                labels[r, :n] = torch.tensor(e.labels)
                mask[r, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE).sum())
    return total, count


def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
                     tools: list[list[dict] | None] | None = None) -> list[str]:
    """Greedy answers to each chat prompt (with its tools, if any), decoded without special tokens."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    answers: list[str] = []
    try:
        with torch.no_grad(), _autocast(model):
            for start in range(0, len(prompts), batch_size):
                texts = [render_prompt(tokenizer, p, tools[start + k] if tools else None)
                         for k, p in enumerate(prompts[start : start + batch_size])]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def answer_rates(answers: list[str], expected: list[str]) -> tuple[float, float]:
    exact, contains = answer_counts(answers, expected)
    return exact / len(expected), contains / len(expected)


def answer_counts(answers: list[str], expected: list[str]) -> tuple[int, int]:
    """(exact matches, answers containing the expected one)."""
    exact = sum(normalise(a) == normalise(e) for a, e in zip(answers, expected))
    contains = sum(normalise(e) in normalise(a) for a, e in zip(answers, expected))
    return exact, contains


def score_both(
    model,
    tokenizer,
    examples: list[Example],
    eot_ids: set[int],
    max_length: int,
    batch_size: int = 8,
    on_stage: Callable[[str], None] | None = None,
    processes: Processes | None = None,
) -> tuple[Scores, Scores, dict]:
    """(adapter scores, base scores, samples) on the same rows; the base is the same
    model with its adapter disabled. In a run of several processes each scores its
    share of the rows and the sums are added up, so every process returns the scores
    of all rows (samples come from this process's share)."""
    procs = processes or Processes()
    share = examples[procs.rank :: procs.world]
    encoded = [encode(tokenizer, e, eot_ids, max_length) for e in share]
    encoded = [e for e in encoded if e.trained]
    answerable = [e for e in share if e.expected is not None]
    prompts = [e.prompt for e in answerable]
    tools = [e.tools for e in answerable]
    expected = [e.expected for e in answerable]
    every_expected = [e.expected for e in examples if e.expected is not None]
    max_new = 0
    if every_expected:  # from all rows, so each share generates as far as the whole would
        longest = max(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in every_expected)
        max_new = min(MAX_NEW_TOKENS, longest + 8)

    was_training = model.training
    model.eval()
    results = []
    samples: dict = {}
    try:
        for which in ("adapter", "base"):
            ctx = model.disable_adapter() if which == "base" else contextlib.nullcontext()
            with ctx:
                if on_stage:
                    on_stage(f"eval loss ({which})")
                total, count = loss_sums(model, encoded, tokenizer.pad_token_id, batch_size)
                exact = contains = 0
                if answerable:
                    if on_stage:
                        on_stage(f"answers ({which})")
                    answers = generate_answers(model, tokenizer, prompts, max_new, tools=tools)
                    exact, contains = answer_counts(answers, expected)
                    samples[which] = answers[:3]
            parts = procs.gather((total, count, len(encoded), exact, contains, len(answerable)))
            total, count, loss_rows, exact, contains, answer_rows = (sum(col) for col in zip(*parts))
            loss = total / count if count else float("nan")
            scores = Scores(eval_loss=loss, perplexity=math.exp(min(loss, 50.0)),
                            loss_rows=loss_rows, answer_rows=answer_rows)
            if answer_rows:
                scores.exact_match, scores.contains = exact / answer_rows, contains / answer_rows
            results.append(scores)
    finally:
        if was_training:
            model.train()
    if answerable:
        samples["expected"] = expected[:3]
    return results[0], results[1], samples
