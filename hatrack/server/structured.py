"""Structured answers: the grammar a request's `response_format` and `tools` ask for, and
the tool calls read back out of the answer text.

- `response_format` json_object / json_schema: the whole answer is compact JSON valid
  against the schema (json_object: any JSON object).
- `tools` with `tool_choice` "required" or a named function: the whole answer is one or
  more `<tool_call>{"name":...,"arguments":{...}}</tool_call>` blocks (exactly one when
  `parallel_tool_calls` is false or a function is named), each call's arguments valid
  against that function's `parameters` schema.
- `tool_choice` "auto" (the default with tools): the answer is either such calls, or
  text that does not start with `<tool_call>` (valid against `response_format`'s schema
  when one is given as well).
- `tool_choice` "none": no grammar; the model answers in text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from hatrack.server.engine.constraints import json_schema_grammar, lark_grammar, schema_for_lark
from hatrack.tool_format import CALL_CLOSE, CALL_OPEN

MAX_PARALLEL_CALLS = 8  # a bound, so a model cannot loop on calls until max_tokens
ANY_OBJECT = {"type": "object"}


def response_schema(response_format) -> dict | None:
    """The JSON schema `response_format` asks for, or None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    return response_format.json_schema.schema_ or {}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def tool_grammar(tools: list[dict], choice, parallel: bool | None, text_schema: dict | None) -> str | None:
    """The Lark grammar for a request with tools, or None when nothing is constrained."""
    if choice == "none":
        return None
    named = choice.function.name if hasattr(choice, "function") else None
    fns = [t["function"] for t in tools if named is None or t["function"]["name"] == named]
    rules, names = [], []
    for i, fn in enumerate(fns):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        head = CALL_OPEN + '{"name":' + json.dumps(fn["name"], separators=(",", ":")) + ',"arguments":'
        rules.append(f"fn_{i}: {_lark_string(head)} {schema_for_lark(params)} {_lark_string('}' + CALL_CLOSE)}")
        names.append(f"fn_{i}")
    many = named is None and parallel is not False
    calls = f"calls: call{{1,{MAX_PARALLEL_CALLS}}}" if many else "calls: call"
    lines = [calls, "call: " + " | ".join(names), *rules]
    if choice == "required" or named is not None:
        start = "start: calls"
    elif text_schema is not None:
        start = f"start: calls | {schema_for_lark(text_schema)}"
    else:
        # free text that does not open with a call block (an empty answer is text too)
        lines.append(f"TEXT: /(.|\\n)+/ & ~/{re.escape(CALL_OPEN)}(.|\\n)*/")
        start = "start: calls | TEXT | \"\""
    return lark_grammar("\n".join([start, *lines]))


def request_grammar(body) -> str | None:
    """The grammar text a completion request asks for, or None (unconstrained)."""
    schema = response_schema(getattr(body, "response_format", None))
    tools = getattr(body, "tools", None)
    if tools:
        return tool_grammar([t.model_dump(by_alias=True, exclude_none=True) for t in tools],
                            body.tool_choice or "auto", body.parallel_tool_calls, schema)
    return json_schema_grammar(schema) if schema is not None else None


def wants_tool_calls(body) -> bool:
    """Whether the answer may hold tool calls to read back."""
    return bool(getattr(body, "tools", None)) and (body.tool_choice or "auto") != "none"


# ------------------------------------------------------------ reading calls back

_HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')
_END = "}" + CALL_CLOSE


@dataclass
class ToolCallStream:
    """Answer text in, OpenAI chat deltas out: `{"content": ...}` for text,
    `{"tool_calls": [...]}` for calls (first the id and name, then pieces of the
    arguments), in the shape streaming clients accumulate."""

    mode: str = "start"  # start | head | args | text
    pending: str = ""
    calls: list[dict] = field(default_factory=list)
    content: str = ""

    def push(self, text: str) -> list[dict]:
        self.pending += text
        out: list[dict] = []
        while self.pending:
            if self.mode == "text":
                out.append({"content": self.pending})
                self.content += self.pending
                self.pending = ""
            elif self.mode == "start":
                if self.pending.startswith(CALL_OPEN):
                    self.mode, self.pending = "head", self.pending[len(CALL_OPEN):]
                elif CALL_OPEN.startswith(self.pending):
                    break  # may still become a call
                else:
                    self.mode = "text"
            elif self.mode == "head":
                found = _HEAD.match(self.pending)
                if found is None:
                    opening = '{"name":'
                    if len(self.pending) > 4096 or not (self.pending.startswith(opening)
                                                        or opening.startswith(self.pending)):
                        self.mode, self.pending = "text", CALL_OPEN + self.pending
                        continue
                    break
                call = {"index": len(self.calls), "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": json.loads(found.group(1)), "arguments": ""}}
                self.calls.append(call)
                out.append({"tool_calls": [json.loads(json.dumps(call))]})
                self.mode, self.pending = "args", self.pending[found.end():]
            else:  # args
                end = self.pending.find(_END)
                upto = end if end != -1 else len(self.pending) - _held_back(self.pending)
                if upto > 0:
                    self._arguments(self.pending[:upto], out)
                if end == -1:
                    self.pending = self.pending[upto:]
                    break
                self.mode, self.pending = "start", self.pending[end + len(_END):]
        return out

    def finish(self) -> list[dict]:
        """The held text at the end (an answer cut short mid-call keeps what it had)."""
        out: list[dict] = []
        if self.pending:
            if self.mode == "args":
                self._arguments(self.pending, out)
            else:
                text = (CALL_OPEN if self.mode == "head" else "") + self.pending
                out.append({"content": text})
                self.content += text
            self.pending = ""
        return out

    def _arguments(self, piece: str, out: list[dict]) -> None:
        call = self.calls[-1]
        call["function"]["arguments"] += piece
        out.append({"tool_calls": [{"index": call["index"], "function": {"arguments": piece}}]})


def _held_back(text: str) -> int:
    """How many trailing characters may be the start of the closing `}</tool_call>`."""
    for k in range(min(len(_END) - 1, len(text)), 0, -1):
        if text.endswith(_END[:k]):
            return k
    return 0


def read_answer(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer."""
    stream = ToolCallStream()
    stream.push(text)
    stream.finish()
    return (stream.content or None) if stream.calls else stream.content, stream.calls

