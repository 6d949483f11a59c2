"""Which tokens end an answer, read from the base's own files.

Shared by the trainer (it trains the adapter to emit them) and the server (it stops
there), so both agree. Torch-free: the server imports it without the trainer.
"""

from __future__ import annotations

from pathlib import Path

# a text no template changes and no tokenizer merges with what follows it
_MARKER = "hatrack answer 7f3a"


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos, the generation config's
    eos_token_id(s), and the special token the chat template puts after an answer."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(x) for x in eos)
    template_end = template_end_of_turn_id(tokenizer)
    if template_end is not None:
        ids.add(template_end)
    return ids


def template_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's content
    (`<|im_end|>`, `<|eot_id|>`, ...), or None (no template, or plain text follows)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answer = {"role": "assistant", "content": _MARKER}
    text = None
    # some templates refuse a conversation that opens with the assistant
    for messages in ([answer], [{"role": "user", "content": "hi"}, answer]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            break
        except Exception:
            continue
    if not text or _MARKER not in text:
        return None
    after = text[text.rindex(_MARKER) + len(_MARKER):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    return int(ids[0]) if _is_special(tokenizer, int(ids[0])) else None


def _is_special(tokenizer, token_id: int) -> bool:
    if token_id in set(tokenizer.all_special_ids):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    token = added.get(token_id)
    return bool(token is not None and getattr(token, "special", False))


def load_generation_config(folder: str | Path):
    """The base's GenerationConfig, or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None
