"""Structured answers through a real `hatrack serve` on the tiny random model: every
answer to `response_format` parses and validates against its schema, tool calls come back
in OpenAI's shape (streamed too) with arguments valid against the function's schema,
the openai client's `parse` and LangChain work unchanged, and a mixed batch of
constrained and free rows over several adapters answers each row as if it ran alone."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
MODELS = [BASE, "acme", "globex"]
HI = [{"role": "user", "content": "Fill in the form."}]

SCHEMAS = {
    "flat": {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99}},
             "required": ["ok", "n"], "additionalProperties": False},
    "enum_and_pattern": {"type": "object", "properties": {
        "size": {"enum": ["S", "M", "L"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["size", "code"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "tier": {"enum": ["free", "pro"]}}, "required": ["name", "tier"], "additionalProperties": False},
        "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "bounded_array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "maxItems": 2}},
        "required": ["tags", "scores"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
REFUND = {"type": "function", "function": {
    "name": "refund", "parameters": {"type": "object", "properties": {
        "order": {"type": "string", "pattern": "^[0-9]{4}$"}}, "required": ["order"], "additionalProperties": False}}}
TOOLS = [WEATHER, REFUND]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("structured-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(registry, BASE, tiny_base_dir, home / "src", ["acme", "globex"])
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--max-tokens", "96").start()
        yield server
        server.stop()


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_answers_validate_against_every_schema_greedy_and_sampled(server):
    c = client(server)
    asks = [(name, model, seed) for name in SCHEMAS for model in MODELS for seed in (None, 7)]

    def ask(name, model, seed):
        kw = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        return c.chat.completions.create(model=model, messages=HI, max_tokens=96,
                                         response_format=schema_format(name), **kw)

    with cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda a: ask(*a), asks))
    for (name, model, seed), reply in zip(asks, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (name, model, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    # json_object: any JSON object, also on the completions route (as vLLM accepts it)
    obj = c.chat.completions.create(model="acme", messages=HI, temperature=0, max_tokens=96,
                                    response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason in ("stop", "length")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    text = c.completions.create(model="globex", prompt="Order:", temperature=0, max_tokens=96,
                                extra_body={"response_format": schema_format("nested")})
    assert text.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text.choices[0].text), SCHEMAS["nested"])


def test_running_out_of_tokens_is_length_with_the_json_cut(server):
    reply = client(server).chat.completions.create(model=BASE, messages=HI, temperature=0, max_tokens=3,
                                                   response_format=schema_format("nested"))
    assert reply.choices[0].finish_reason == "length"
    content = reply.choices[0].message.content
    assert content.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


def test_stream_of_a_schema_answer_equals_the_whole_answer(server):
    c = client(server)
    whole = c.chat.completions.create(model="acme", messages=HI, temperature=0, response_format=schema_format("flat"))
    chunks = list(c.chat.completions.create(model="acme", messages=HI, temperature=0, stream=True,
                                            response_format=schema_format("flat")))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


class Ticket(BaseModel):
    priority: Literal["low", "high"]
    team: Literal["billing", "shipping"]
    minutes: int = Field(ge=1, le=60)
    summary: str = Field(max_length=8)


def test_openai_parse_returns_the_pydantic_object(server):
    reply = client(server).chat.completions.parse(model="globex", messages=HI, temperature=0, max_tokens=96,
                                                  response_format=Ticket)
    ticket = reply.choices[0].message.parsed
    assert isinstance(ticket, Ticket) and 1 <= ticket.minutes <= 60


def assert_call_valid(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


def test_required_tool_call_whole_and_streamed(server):
    c = client(server)
    kw = dict(model="acme", messages=HI, temperature=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    whole = c.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_call_valid(choice.message.tool_calls[0])

    calls: dict[int, dict] = {}
    finish = None
    for chunk in c.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        assert not delta.content
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = part.id or entry["id"]
            entry["name"] = (part.function.name if part.function and part.function.name else entry["name"])
            entry["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == choice.message.tool_calls[0].function.name
    assert calls[0]["arguments"] == choice.message.tool_calls[0].function.arguments
    assert calls[0]["id"].startswith("call_")


def test_named_tool_choice_calls_that_function_and_auto_answers_text_or_calls(server):
    c = client(server)
    for model in MODELS:
        named = c.chat.completions.create(model=model, messages=HI, temperature=0, tools=TOOLS,
                                          tool_choice={"type": "function", "function": {"name": "refund"}})
        (call,) = named.choices[0].message.tool_calls
        assert call.function.name == "refund" and named.choices[0].finish_reason == "tool_calls"
        assert_call_valid(call)
        for seed in (1, 2, 3):
            auto = c.chat.completions.create(model=model, messages=HI, temperature=1.0, seed=seed, tools=TOOLS,
                                             max_tokens=96)
            message = auto.choices[0].message
            if message.tool_calls:
                assert message.content is None and auto.choices[0].finish_reason in ("tool_calls", "length")
                if auto.choices[0].finish_reason == "tool_calls":
                    for call in message.tool_calls:
                        assert_call_valid(call)
            else:
                assert not (message.content or "").startswith("<tool_call>")
        none = c.chat.completions.create(model=model, messages=HI, temperature=0, max_tokens=8, tools=TOOLS,
                                         tool_choice="none")
        assert none.choices[0].message.tool_calls is None


def test_tool_results_in_the_history_are_rendered_and_answered(server):
    history = HI + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city":"Oslo","days":2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
    ]
    reply = client(server).chat.completions.create(model="globex", messages=history, temperature=0, max_tokens=8,
                                                   tools=TOOLS, tool_choice="none")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 100


def test_langchain_structured_output_and_bound_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="acme", base_url=f"{server.url}/v1", api_key="none", temperature=0, max_tokens=96,
                     max_retries=0)
    ticket = llm.with_structured_output(Ticket).invoke("Open a ticket.")
    assert isinstance(ticket, Ticket)

    def get_weather(city: Literal["Paris", "Rome", "Oslo"], days: int) -> str:
        """Weather in a city for some days."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(call["args"]["days"], int)


def test_mixed_batch_answers_each_row_as_alone(server):
    c = client(server)
    rows = [
        dict(model=BASE),
        dict(model=BASE, response_format=schema_format("nested")),
        dict(model="acme"),
        dict(model="acme", response_format=schema_format("bounded_array")),
        dict(model="acme", tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
        dict(model="globex"),
        dict(model="globex", response_format=schema_format("enum_and_pattern")),
        dict(model="globex", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    ]

    def ask(row):
        reply = c.chat.completions.create(messages=HI, temperature=0, max_tokens=48, **row)
        message = reply.choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in message.tool_calls or []]
        return message.content, calls, reply.choices[0].finish_reason

    alone = [ask(row) for row in rows]
    with cf.ThreadPoolExecutor(len(rows) * 2) as pool:
        together = list(pool.map(ask, rows * 2))
    assert together == alone * 2
    # the free rows are today's answers: the same as in a batch where nothing is constrained
    free = [row for row in rows if len(row) == 1]
    with cf.ThreadPoolExecutor(len(free)) as pool:
        plain = list(pool.map(ask, free))
    assert plain == [a for a, row in zip(alone, rows) if len(row) == 1]


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wizard"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_schema_the_engine_cannot_compile_is_400_naming_the_problem(server, body, param):
    resp = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "acme", "messages": HI, "max_tokens": 4, **body}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_schema"
    assert "look-around" in error["message"] or "wizard" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model=BASE, prompt="x", max_tokens=4,
                                          extra_body={"response_format": body.get("response_format",
                                                                                   {"type": "json_schema"})})
