"""Examples -> token ids and labels, with the loss on answer tokens only.

Chat rows are rendered with the base's chat template. The trained tokens of an
assistant turn run from the first answer token through the end-of-turn token
(`<|im_end|>` on the default base), so the adapter learns to stop; the
template's whitespace after it is not trained. Text rows train every token plus
an appended end-of-sequence token.
"""

from __future__ import annotations

from dataclasses import dataclass

from hatrack.chat_format import end_of_turn_ids  # noqa: F401  (trainer modules import it from here)
from hatrack.errors import HatrackError
from hatrack.tool_format import render_chat
from hatrack.trainer.data import Example

IGNORE = -100


class LabelMaskError(HatrackError):
    """The rows would teach the adapter nothing useful (no tokens, or never to stop)."""


@dataclass
class Encoded:
    row: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The conversation so far plus the template's assistant header (for generation),
    rendered as the server renders it (tool_format.render_chat)."""
    return render_chat(tokenizer, messages, tools, add_generation_prompt=True)


def encode(tokenizer, example: Example, eot_ids: set[int], max_length: int) -> Encoded:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        ids = ids + [eos] if eos is not None else ids
        labels = list(ids)
    else:
        ids, labels = _encode_chat(tokenizer, example.messages or [], eot_ids, example.row, example.tools)
    truncated = len(ids) > max_length
    return Encoded(row=example.row, input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated)


def _encode_chat(tokenizer, messages, eot_ids: set[int], row: int,
                 tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise HatrackError(f"row {row}: the base model has no chat template; give text rows instead")
    full = render_chat(tokenizer, messages, tools)
    spans = []  # (start, end) character spans of trained answers in `full`
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        through = full if i == len(messages) - 1 else render_chat(tokenizer, messages[: i + 1], tools)
        prefix = render_prompt(tokenizer, messages[:i], tools)
        # Templates that rewrite earlier turns are not prefix-stable; such turns are not trained.
        if full.startswith(through) and through.startswith(prefix):
            spans.append((len(prefix), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        inside = [k for k, (a, _b) in enumerate(enc["offset_mapping"]) if start <= a < end]
        # stop at the turn's last end-of-turn token: what the template adds after it is not the answer
        last_eot = max((k for k in inside if ids[k] in eot_ids), default=None)
        for k in inside:
            if last_eot is None or k <= last_eot:
                labels[k] = ids[k]
    return ids, labels


@dataclass
class MaskHealth:
    """What the label mask trains, recorded with the train metrics."""

    rows: int
    tokens: int
    trained_tokens: int
    rows_without_trained_tokens: int
    rows_training_end_of_turn: int
    truncated_rows: int

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_token_share": round(self.trained_share, 4),
            "rows_without_trained_tokens": self.rows_without_trained_tokens,
            "rows_training_end_of_turn": self.rows_training_end_of_turn,
            "truncated_rows": self.truncated_rows,
        }


def check_mask(encoded: list[Encoded], eot_ids: set[int], label: str, max_length: int, eot_name: str) -> MaskHealth:
    """Refuse a dataset that trains no tokens, or never trains the end-of-turn token."""
    health = MaskHealth(
        rows=len(encoded),
        tokens=sum(len(e.input_ids) for e in encoded),
        trained_tokens=sum(e.trained for e in encoded),
        rows_without_trained_tokens=sum(1 for e in encoded if e.trained == 0),
        rows_training_end_of_turn=sum(1 for e in encoded if any(x in eot_ids for x in e.labels)),
        truncated_rows=sum(1 for e in encoded if e.truncated),
    )
    if health.trained_tokens == 0:
        raise LabelMaskError(
            f"{label}: no row trains any token (answers empty, or cut off by --max-length {max_length})"
        )
    if health.rows_training_end_of_turn == 0:
        raise LabelMaskError(
            f"{label}: no row trains the end-of-turn token {eot_name}, so the adapter would never learn to stop"
            f" (answers cut off by --max-length {max_length}?)"
        )
    return health
