"""The response side of the OpenAPI schema: what each route answers, errors included,
so the published /openapi.json is a contract a client (or a fuzzer) can hold the
server to. The route code builds plain dicts; these models only describe them."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text, valid against the function's parameters when the call completed


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # null when the answer is tool calls
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """chat `logprobs: true`: one entry per answer token, in order."""

    content: list[TokenLogprob] | None
    refusal: None = None


class TextLogprobs(BaseModel):
    """completions `logprobs: k`: per answer token its text, logprob, the k most likely
    tokens (and the picked one) as text -> logprob, and where its text starts in the answer."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


# streamed chunks: finish_reason "error" ends a stream whose generation failed after
# the 200 was sent (the status can no longer change)
StreamFinish = Literal["stop", "length", "error"] | None
ChatStreamFinish = Literal["stop", "length", "tool_calls", "error"] | None


class FunctionDelta(BaseModel):
    name: str | None = None  # in the call's first delta
    arguments: str  # the next piece of the arguments' JSON text


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # in the call's first delta
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatStreamFinish


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: StreamFinish


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # adapters: the base they run on


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    base: str


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route can answer."""
    why = {
        400: "Bad parameters, a malformed body, or a prompt beyond the context",
        401: "Missing, wrong or revoked API key (unless the server runs with --no-auth)",
        404: "Unknown model, or one this key may not use (the same answer for both)",
        413: "The request body is larger than the server's limit",
        422: "The model names an adapter whose stored artifact cannot be loaded",
        429: "The queue is full; retry later",
        503: ("The base model is not loaded (yet), the server is shutting down, or (completions) the KV cache or "
              "memory ran out for this request; retry later"),
    }
    return {status: {"model": ErrorResponse, "description": why[status]} for status in statuses}


def completion_ok(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200: a JSON body, or with `stream: true` server-sent events, each a JSON chunk
    and the last `[DONE]` (OpenAPI 3.1: an event stream's `schema` describes one event)."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}},
        "if": {"properties": {"data": {"const": "[DONE]"}}},
        "else": {"properties": {"data": {
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
        }}},
    }
    return {200: {"model": model, "description": "The completion (a JSON body, or events with stream: true)",
                  "content": {"text/event-stream": {"schema": event}}}}


_STREAM_CHUNKS = (ChatCompletionChunk, TextCompletionChunk)


def install_openapi(app: FastAPI) -> None:
    """Build /openapi.json once: FastAPI's schema, plus the streamed chunk models, the
    bearer key marked optional (an open server needs none), and without the 422
    validation answer FastAPI adds by itself (hatrack answers 400)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes, separate_input_output_schemas=False)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in _STREAM_CHUNKS:
            generated = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
            components.update(generated.pop("$defs", {}))
            components[model.__name__] = generated
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                if operation.get("security") and {} not in operation["security"]:
                    operation["security"].append({})  # a key is needed only once keys exist
                responses = operation.get("responses", {})
                generated_422 = responses.get("422", {}).get("content", {}).get("application/json", {})
                if generated_422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
