"""What a request body must be before any route sees it: no larger than the limit
(413, decided from Content-Length when there is one, else by counting chunks as they
arrive, so an oversized body is never held whole), and for JSON routes: declared as
JSON, valid UTF-8, valid JSON, and an object (400 each, with the OpenAI error body)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hatrack.server.errors import bad_request
from hatrack.server.schemas import error_body

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-body; FastAPI re-raises HTTPExceptions from body reading,
    so the app's handler turns it into the OpenAI-shaped 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit), headers={"Connection": "close"})


def too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes"


class BodyLimit:
    """ASGI middleware enforcing `max_bytes` on every HTTP request body."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)  # nothing of the body is read
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse

        body = error_body(too_large_message(self.max_bytes), "invalid_request_error", "request_too_large")
        await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The body of a JSON route as a dict, or an APIError (400) saying what is wrong."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise bad_request("Content-Type must be application/json", None, "invalid_content_type")
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object", None, "invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8", None, "invalid_encoding") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # err.msg is json's own wording ("Expecting value"), never the body itself
        raise bad_request(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                          None, "invalid_json") from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply", None, "invalid_json") from None
    except ValueError:  # e.g. an integer literal with thousands of digits
        raise bad_request("request body is not valid JSON: a number is too long", None, "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_value")
    if _SURROGATE_ESCAPE.search(text):
        try:  # a \\ud800 escape with no partner decodes to a str that cannot be encoded again
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("the request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)",
                              None, "invalid_encoding") from None
    return value


class JSONBodyRoute(APIRoute):
    """Routes with a request body check it with `parse_json_object` before FastAPI's own
    parsing and validation, so every malformed body gets one clear 400."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request):
            value = parse_json_object(await request.body(), request.headers.get("content-type"))
            request._json = value  # Starlette's cache of request.json(): FastAPI need not parse again
            return await handler(request)

        return checked
