"""Conversations with tools, rendered the same way for training and for serving.

Tool definitions, assistant tool calls and tool results go through the base's own
chat template when it has a tool format (transformers `apply_chat_template(...,
tools=...)` writes the tools somewhere in the prompt). A template without one (the
default base SmolLM2's ignores `tools`) gets hatrack's fallback instead:

- the tools are listed in the system message, one JSON object per line, after
  `FALLBACK_INTRO`, with how to call them;
- an assistant tool call is the assistant's text `<tool_call>{"name":...,"arguments":{...}}</tool_call>`
  (compact JSON, one block per call);
- a tool result is a user message `<tool_response>{...}</tool_response>`.

Whatever the template, a served model calls a tool by writing such `<tool_call>` blocks
(the server's grammar enforces them), so an adapter trained on rows with tool calls
learns exactly what the server parses. Torch-free: the trainer and server both import it.
"""

from __future__ import annotations

import json
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESULT_OPEN = "<tool_response>"
RESULT_CLOSE = "</tool_response>"
FALLBACK_INTRO = "You can call these tools (each with its JSON schema of arguments):"
FALLBACK_HOW = (
    "To call a tool, answer with one block per call and nothing else:\n"
    f'{CALL_OPEN}{{"name":"<tool name>","arguments":{{...}}}}{CALL_CLOSE}\n'
    f"Tool results come back as {RESULT_OPEN}...{RESULT_CLOSE}."
)
_MARKER = "hatrack_tool_7f3a"


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` a dict or its JSON text."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return f'{CALL_OPEN}{{"name":{compact(name)},"arguments":{compact(arguments)}}}{CALL_CLOSE}'


def template_has_tools(tokenizer) -> bool:
    """Whether the chat template writes the tools it is given into the prompt."""
    cached = getattr(tokenizer, "_hatrack_template_has_tools", None)
    if cached is not None:
        return cached
    tool = {"type": "function", "function": {"name": _MARKER, "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False,
                                             add_generation_prompt=True)
        found = _MARKER in text
    except Exception:
        found = False
    try:
        tokenizer._hatrack_template_has_tools = found
    except AttributeError:
        pass
    return found


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = False) -> str:
    """The conversation as prompt text. Messages are OpenAI-shaped dicts: role, content,
    and for an assistant `tool_calls` ([{"function": {"name", "arguments"}}]), for a tool
    result `tool_call_id`."""
    has_tool_parts = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not has_tool_parts:
        plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    if template_has_tools(tokenizer):
        return tokenizer.apply_chat_template(_native(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _native(messages: list[dict]) -> list[dict]:
    """Messages as transformers' tool-aware templates expect them (arguments as objects)."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {"type": "function", "id": c.get("id"),
                 "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]
            ]
        if m["role"] == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain role/content messages carrying the tools, calls and results as text."""
    out: list[dict] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "".join(call_text(c["function"]["name"], c["function"].get("arguments") or {})
                            for c in m["tool_calls"])
            content = f"{content}{calls}" if content else calls
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"{RESULT_OPEN}{content}{RESULT_CLOSE}"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        listing = "\n".join(compact(_tool_line(t)) for t in tools)
        prompt = f"{FALLBACK_INTRO}\n{listing}\n{FALLBACK_HOW}"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _tool_line(tool: dict) -> dict:
    fn = tool.get("function", tool)
    line = {"name": fn["name"]}
    if fn.get("description"):
        line["description"] = fn["description"]
    line["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return line


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return value
    return value if value is not None else {}
