"""Datasets in: JSONL, JSON, CSV or Parquet files, or a Hugging Face dataset name.

Every row becomes an `Example` (a chat, or plain text). All rows are checked before
anything is trained; every bad row is named by file and row number.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hatrack.errors import HatrackError
from hatrack.hashing import sha256_file
from hatrack.tool_format import call_text

ROLES = ("system", "user", "assistant", "tool")
SHAPES = "messages | instruction/output | prompt/completion | text"
_MAX_LISTED = 5


class DatasetError(HatrackError):
    """A dataset cannot be read, or some of its rows fit no known shape.

    str() is one line: the first bad row, then how many more (all of them are in
    `.problems`, one line each)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        first = problems[0]
        if len(problems) > 1:
            rest = ", ".join(p.split(":", 1)[0].rsplit(" ", 1)[-1] for p in problems[1 : 1 + _MAX_LISTED])
            more = "" if len(problems) <= 1 + _MAX_LISTED else ", ..."
            first += f" (and {len(problems) - 1} more bad rows: {rest}{more})"
        super().__init__(first)


@dataclass
class Example:
    """One training row. `messages` for chat-shaped rows (with `tools` when the
    conversation calls tools), `text` for plain text."""

    row: int
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None

    @property
    def expected(self) -> str | None:
        """The answer a held-out row expects: its last assistant message (tool calls as
        the `<tool_call>` text the model writes)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            last = self.messages[-1]
            calls = "".join(call_text(c["function"]["name"], c["function"]["arguments"])
                            for c in last.get("tool_calls") or [])
            return (last.get("content") or "") + calls
        return None

    @property
    def prompt(self) -> list[dict[str, str]] | None:
        """The conversation up to (not including) the expected answer."""
        return self.messages[:-1] if self.expected is not None else None


@dataclass
class Dataset:
    source: str  # what the user passed
    label: str  # how rows are named in messages (the file's name)
    sha256: str  # of the file bytes; of the dataset's fingerprint for hub datasets
    examples: list[Example] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.examples)


# ---------------------------------------------------------------- reading


def load_dataset(source: str) -> Dataset:
    """Read and check every row of `source`; raise DatasetError naming each bad row."""
    path = Path(source).expanduser()
    if path.is_file():
        label = path.name
        sha = sha256_file(path)
        records = _read_file(path, label)
    elif path.exists():
        raise DatasetError([f"{source}: not a file"])
    elif _looks_like_hub_name(source):
        label = source
        records, sha = _read_hub(source)
    else:
        raise DatasetError([f"{source}: no such file"])
    examples: list[Example] = []
    problems: list[str] = []
    for row, record in records:
        try:
            examples.append(parse_row(record, row))
        except _RowError as err:
            problems.append(f"{label} row {row}: {err}")
    if problems:
        raise DatasetError(problems)
    if not examples:
        raise DatasetError([f"{label}: no rows"])
    return Dataset(source=source, label=label, sha256=sha, examples=examples)


def _looks_like_hub_name(source: str) -> bool:
    # "name" or "owner/name", never something with a file suffix or a path of depth > 2
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not Path(source).suffix


def _read_file(path: Path, label: str) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return list(_read_jsonl(path, label))
        if suffix == ".json":
            return _read_json(path, label)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path, label)
    except UnicodeDecodeError:
        raise DatasetError([f"{label}: not UTF-8 text"]) from None
    raise DatasetError([f"{label}: unknown file type {suffix or '(none)'}; expected .jsonl, .json, .csv or .parquet"])


def _read_jsonl(path: Path, label: str) -> Iterable[tuple[int, Any]]:
    problems = []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                # without its newline, so a truncated row's error points into the row
                # (column 47), not at the start of a line that does not exist (column 1)
                rows.append((lineno, json.loads(line.rstrip("\r\n"))))
            except json.JSONDecodeError as err:
                problems.append(f"{label} row {lineno}: not valid JSON ({err.msg} at column {err.colno})")
    if problems:
        raise DatasetError(problems)
    return rows


def _read_json(path: Path, label: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError([f"{label}: not valid JSON ({err.msg} at line {err.lineno})"]) from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: one list of rows inside an object
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise DatasetError([f"{label}: expected a JSON list of rows (or an object holding one list)"])
    return list(enumerate(data, start=1))


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        # a row's number is its data row (1-based), not counting the header
        return [(i, {k: v for k, v in rec.items() if k is not None}) for i, rec in enumerate(reader, start=1)]


def _read_parquet(path: Path, label: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for broken files
        raise DatasetError([f"{label}: not a readable Parquet file ({type(err).__name__})"]) from None
    return list(enumerate(table.to_pylist(), start=1))


def _read_hub(name: str) -> tuple[list[tuple[int, Any]], str]:
    """A Hugging Face dataset (its train split), through datasets.load_dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # no network, unknown name, ...
        raise DatasetError([f"{name}: no such file, and not a loadable Hugging Face dataset ({type(err).__name__})"]) from None
    sha = hashlib.sha256(f"hf:{name}:{ds._fingerprint}".encode()).hexdigest()
    return list(enumerate(ds, start=1)), sha


# ---------------------------------------------------------------- row shapes


class _RowError(Exception):
    pass


def parse_row(record: Any, row: int) -> Example:
    """One raw row -> Example, or _RowError saying what was expected."""
    if not isinstance(record, dict):
        raise _RowError(f"expected an object with one of {SHAPES}; got {type(record).__name__}")
    keys = {k for k, v in record.items() if v is not None and v != ""}
    if "messages" in keys:
        tools = _parse_tools(record["tools"]) if "tools" in keys else None
        return Example(row=row, messages=_parse_messages(record["messages"], "messages"), tools=tools)
    if {"instruction", "output"} <= keys:
        instruction = _string(record, "instruction")
        extra = _string(record, "input") if "input" in keys else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output")}]
        if "system" in keys:
            msgs.insert(0, {"role": "system", "content": _string(record, "system")})
        return Example(row=row, messages=msgs)
    if {"prompt", "completion"} <= keys:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion (TRL's shape)
            msgs = _parse_messages(prompt, "prompt")
            if isinstance(completion, list):
                msgs += _parse_messages(completion, "completion")
            else:
                msgs.append({"role": "assistant", "content": _string(record, "completion")})
            return Example(row=row, messages=_check_turns(msgs, "prompt/completion"))
        return Example(
            row=row,
            messages=[
                {"role": "user", "content": _string(record, "prompt")},
                {"role": "assistant", "content": _string(record, "completion")},
            ],
        )
    if "text" in keys:
        text = _string(record, "text")
        if not text.strip():
            raise _RowError("text is empty")
        return Example(row=row, text=text)
    got = ", ".join(sorted(record)) or "(none)"
    raise _RowError(f"expected one of {SHAPES}; got keys: {got}")


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _RowError(f"{key} must be a string; got {type(value).__name__}")
    return value


def _json_text(value: Any, key: str, what: str) -> Any:
    """CSV cells and some exports hold lists and objects as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise _RowError(f"{key} must be {what}; got a string that is not JSON") from None
    return value


def _parse_messages(value: Any, key: str) -> list[dict[str, Any]]:
    value = _json_text(value, key, "a list of {role, content} objects")
    if not isinstance(value, list) or not value:
        raise _RowError(f"{key} must be a non-empty list of {{role, content}} objects")
    msgs = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict) or "role" not in msg:
            raise _RowError(f"{where} must be an object with role and content")
        role = msg["role"]
        if role not in ROLES:
            raise _RowError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
        calls = msg.get("tool_calls")
        if calls is not None and role != "assistant":
            raise _RowError(f"{where}.tool_calls is only for assistant messages")
        content = msg.get("content")
        if "content" not in msg and not calls:
            raise _RowError(f"{where} must be an object with role and content")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise _RowError(f"{where}.content must be a string; got {type(content).__name__}")
        parsed: dict[str, Any] = {"role": role, "content": content}
        if calls:
            parsed["tool_calls"] = _parse_tool_calls(calls, f"{where}.tool_calls")
        if role == "tool" and msg.get("tool_call_id") is not None:
            if not isinstance(msg["tool_call_id"], str):
                raise _RowError(f"{where}.tool_call_id must be a string")
            parsed["tool_call_id"] = msg["tool_call_id"]
        msgs.append(parsed)
    return msgs if key != "messages" else _check_turns(msgs, key)


def _parse_tool_calls(value: Any, key: str) -> list[dict[str, Any]]:
    """OpenAI's tool_calls shape; arguments an object or its JSON text (kept as an object)."""
    if not isinstance(value, list) or not value:
        raise _RowError(f"{key} must be a non-empty list of {{function: {{name, arguments}}}} objects")
    calls = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _RowError(f"{key}[{i}].function.name must be a non-empty string")
        args = _json_text(fn.get("arguments", {}), f"{key}[{i}].function.arguments", "a JSON object")
        if not isinstance(args, dict):
            raise _RowError(f"{key}[{i}].function.arguments must be a JSON object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


def _parse_tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's tools shape: [{"type": "function", "function": {name, description, parameters}}]."""
    value = _json_text(value, "tools", "a list of tool definitions")
    if not isinstance(value, list):
        raise _RowError("tools must be a list of {type: function, function: {name, parameters}} objects")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _RowError(f"tools[{i}].function.name must be a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _RowError(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append({"type": "function", "function": fn})
    return tools


def _check_turns(msgs: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise _RowError(f"{key} has no assistant message to learn from")
    if "user" not in roles[: roles.index("assistant")]:
        raise _RowError(f"{key} must have a user message before the first assistant message")
    return msgs


# ---------------------------------------------------------------- held-out split


MIN_HELDOUT = 3


def split(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, heldout), deterministic by seed. eval_split 0 keeps every row for training."""
    if not 0 <= eval_split < 1:
        raise HatrackError(f"--eval-split must be in [0, 1); got {eval_split}")
    if eval_split == 0:
        return list(examples), []
    n_eval = max(MIN_HELDOUT, math.ceil(len(examples) * eval_split))
    if len(examples) - n_eval < 1:
        raise HatrackError(
            f"{len(examples)} rows are too few to hold out {n_eval} for evaluation; add rows or pass --eval-split 0"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
