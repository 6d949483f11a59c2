"""OpenAI request shapes, with the bounds hatrack enforces: a request outside them is a
400 naming the parameter before it reaches the engine.

Requests are strict. An unknown field is refused the way OpenAI refuses it. Fields
real OpenAI clients send are accepted while they ask for nothing hatrack lacks (`user`,
`metadata`, `response_format: {"type": "text"}`, ...); asking for a feature hatrack
does not implement (echo, suffix, legacy `functions`) is a 400 naming that parameter
rather than a silent no-op. `response_format` and `tools` are grammar-constrained
(structured.py). Numbers are never coerced from
strings or booleans, and NaN or infinities are refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 512  # the stop hold-back scan is quadratic in a stop's length
MAX_MESSAGES = 2048
MAX_TOKENS = 1_000_000
MAX_CHOICES = 128
MAX_BIASES = 300  # OpenAI's limit on logit_bias entries
INT64 = 2**63

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def unsupported(param: str, what: str) -> PydanticCustomError:
    """A 400 with code `unsupported_parameter` (see errors.py)."""
    return PydanticCustomError(
        "unsupported_parameter", "{param}: {what} is not supported by hatrack",
        {"param": param, "what": what},
    )


def only(*accepted: dict[str, Any]) -> WithJsonSchema:
    """The published schema of a field accepted only in these shapes (or null), so
    /openapi.json says what really passes; the validator says why anything else fails."""
    return WithJsonSchema({"anyOf": [*accepted, {"type": "null"}]})


_STOP_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_EMPTY_LIST = {"type": "array", "maxItems": 0}


def _neutral(value: Any, neutral: tuple, param: str, what: str) -> Any:
    """`value` when it asks for nothing (None, its default, an empty list or object)."""
    if value in neutral or (isinstance(value, (list, dict)) and not value):
        return value
    raise unsupported(param, what)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # newer clients send it; hatrack never pads chunks


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing_json_schema", 'type "json_schema" needs a json_schema object')
        return self


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = STRICT

    id: str
    type: Literal["function"]
    function: FunctionCall


class _Request(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = STRICT

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # validate_default: an omitted stop must become [] too, not stay None
    stop: Annotated[Union[str, list[str], None],
                    only(_STOP_TEXT, {"type": "array", "items": _STOP_TEXT, "maxItems": MAX_STOP_SEQUENCES})] = \
        Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # token id (as a string, as OpenAI's) -> added to that token's logit
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(default=None, max_length=MAX_BIASES)
    # vLLM's sampling extensions
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOKENS)  # -1 or 0: every token
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=1e-3, le=10.0)  # smaller overflows float32
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        if len(items) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError("too_many", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in items):
            raise PydanticCustomError("empty_stop", "stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise PydanticCustomError("stop_too_long", f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return items

    def token_limit(self) -> tuple[int | None, str]:
        """The answer's token limit and the parameter that set it."""
        newer = getattr(self, "max_completion_tokens", None)  # chat only
        if newer is not None:
            return newer, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def temperature_value(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def top_p_value(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def n_value(self) -> int:
        return self.n or 1

    @property
    def rows(self) -> int:
        """Sequences to generate: n, or best_of candidates to pick n from."""
        return max(self.n_value, getattr(self, "best_of", None) or 1)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = Field(default=None, max_length=256)
    # an assistant reply sent back as history carries these
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Annotated[dict[str, Any] | None, only()] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # checked here so a wrong part gets one clear message, not one per union member
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content_type", "content must be a string or a list of text parts")
        for part in value:
            if not isinstance(part, dict):
                raise PydanticCustomError("content_type", "content parts must be objects like "
                                          '{"type": "text", "text": "..."}')
            if part.get("type") != "text":
                raise unsupported("content", "a content part that is not text")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise PydanticCustomError("content_type", 'a text part is exactly {"type": "text", "text": "..."}')
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: dict | None) -> dict | None:
        return _neutral(value, (None,), "function_call", "function calling")

    def text(self) -> str:
        """Plain text of the message (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, Any]:
        """The message as tool_format.render_chat takes it."""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(_Request):
    # published: an integer top_logprobs needs logprobs: true (the validator says why)
    model_config = ConfigDict(**STRICT, json_schema_extra={
        "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[dict[str, Any]] | None, only(_EMPTY_LIST)] = None
    function_call: Annotated[Union[Literal["none", "auto"], dict[str, Any], None],
                             only({"enum": ["none", "auto"]})] = None
    modalities: Annotated[list[Literal["text", "audio"]] | None,
                          only({"type": "array", "items": {"const": "text"}})] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise PydanticCustomError("conflicting_limits", "max_completion_tokens ({value}) and its older name "
                                      "max_tokens ({other}) differ; send one", {"value": value, "other": other})
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "top_logprobs needs logprobs: true")
        return value

    @property
    def logprob_count(self) -> int | None:
        """None: no logprobs in the answer; k: each token's logprob and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list | None) -> list | None:
        return _neutral(value, (None,), "functions", "legacy function calling (use tools)")

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        return _neutral(value, (None, "none", "auto"), "function_call", "legacy function calling (use tool_choice)")

    @field_validator("tools")
    @classmethod
    def _distinct_tools(cls, value: list[Tool] | None) -> list[Tool] | None:
        if value and len({t.function.name for t in value}) != len(value):
            raise PydanticCustomError("duplicate_tool", "tools has two functions with the same name")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if (value == "required" or isinstance(value, NamedToolChoice)) and not tools:
            raise PydanticCustomError("tool_choice_without_tools", "tool_choice needs tools to choose from")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise PydanticCustomError("unknown_tool", "tool_choice names function '{name}', which is not in tools",
                                      {"name": value.function.name})
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value and "audio" in value:
            raise unsupported("modalities", "audio output")
        return value


class CompletionRequest(_Request):
    prompt: Annotated[Union[str, list[str]], WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]})]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS)
    echo: Annotated[bool | None, only({"const": False})] = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: Annotated[str | None, only({"const": ""})] = None
    response_format: ResponseFormat | None = None  # as vLLM accepts it on completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise unsupported("prompt", "more or fewer than one prompt per request")
            value = value[0]
        if not value:
            raise PydanticCustomError("empty_prompt", "the prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _neutral(value, (None, False), "echo", "echoing the prompt")

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value < n:
            raise PydanticCustomError("best_of_below_n", "best_of ({best_of}) must be at least n ({n})",
                                      {"best_of": value, "n": n})
        if value is not None and value > n and info.data.get("stream"):
            raise PydanticCustomError("best_of_stream", "best_of > n cannot be streamed (the best are known "
                                      "only at the end)")
        return value

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _neutral(value, (None, ""), "suffix", "a suffix (insert mode)")


def request_field_names() -> frozenset[str]:
    """Every field name of the request models, for naming `param` in errors."""
    names: set[str] = set()
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions, ResponseFormat,
                  JsonSchemaFormat, Tool, FunctionDefinition, NamedToolChoice, ToolCall, FunctionCall):
        names.update(model.model_fields)
    return frozenset(names)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
