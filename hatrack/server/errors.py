"""OpenAI-shaped HTTP errors. Nothing here ever carries a traceback or a file path."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hatrack.server.schemas import error_body, request_field_names

_FIELDS = request_field_names()
_SHOWABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@ -]{0,199}$")
_PATHS = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s'\":\\/]*)+")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.code, self.param),
                            status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> APIError:
    # the same answer for unknown and forbidden models, so a key cannot probe names;
    # a name that could never exist is not echoed (it may be a path or control bytes)
    if _SHOWABLE_NAME.fullmatch(model):
        shown = model if len(model) <= 80 else model[:80] + "..."
        message = f"The model '{shown}' does not exist or you do not have access to it."
    else:
        message = ("The model does not exist: model names are lowercase letters, digits, '.', '_' "
                   "and '-' (at most 64), optionally followed by @version or @alias.")
    return APIError(404, message, "invalid_request_error", "model_not_found", "model")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def strip_paths(text: str) -> str:
    """`text` with every file path cut to its last part (`/a/b/c.json` -> `c.json`)."""
    return _PATHS.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1] or "<path>", text)


def _param(loc: tuple, keep_all: bool) -> str | None:
    """`('body', 'messages', 0, 'content', 'str')` -> `messages[0].content`: request
    field names and list indexes, up to the first part that is a pydantic union tag or
    a dict key (or, for unknown fields, the whole location)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif keep_all or part in _FIELDS:
            out += f".{part}" if out else str(part)
        else:
            break
    return out or None


def validation_error(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) for the first thing wrong with a request."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None, "invalid_value"
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        return "request body is not valid JSON", None, "invalid_json"
    if kind == "extra_forbidden":
        param = _param(loc, keep_all=True)
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    param = _param(loc, keep_all=False)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "unsupported_parameter":
        return msg, param, "unsupported_parameter"
    if kind == "missing":
        return f"missing required parameter '{param}'", param, "missing_required_parameter"
    if param:
        return f"invalid value for '{param}': {msg}", param, "invalid_value"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "request body must be a JSON object", None, "invalid_value"
    return f"invalid request body: {msg}", None, "invalid_value"


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_error(exc)
        return JSONResponse(error_body(message, "invalid_request_error", code, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        route = f"{request.method} {request.url.path[:200]}"
        if status == 404:
            message = f"Invalid URL ({route})"
        elif status == 405:
            message = f"Method not allowed ({route})"
        else:
            message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(message, "invalid_request_error", _HTTP_CODES.get(status)),
                            status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), 500)
