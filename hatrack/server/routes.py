"""The routes of `hatrack serve`: module-level handlers that take the server's state
(a FastAPI dependency), and `install_routes` that mounts them with their OpenAPI docs."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

from hatrack.server.auth import Unauthorized
from hatrack.server.catalog import BaseMismatch, ModelNotFound, Target
from hatrack.server.completions import CHAT, TEXT, Job, Kind, Runner, sampling_params
from hatrack.server.engine.constraints import GrammarError
from hatrack.server.errors import APIError, bad_request, model_not_found, strip_paths
from hatrack.server.openapi import (
    ChatCompletion, ChatCompletionChunk, Health, ModelCard, ModelList, Ready, TextCompletion,
    TextCompletionChunk, completion_ok, errors,
)
from hatrack.server.schemas import ChatCompletionRequest, CompletionRequest, error_body
from hatrack.server.state import ServerState
from hatrack.server.structured import request_grammar, wants_tool_calls
from hatrack.tool_format import render_chat
from hatrack.ui.access import COOKIE as UI_COOKIE


def app_state(request: Request) -> ServerState:
    """The state of the app serving this request (one per app: tests run several)."""
    return request.app.state.hatrack


State = Depends(app_state)

# ------------------------------------------------------------ checks every route shares


def require_ready(state: ServerState) -> None:
    if not state.ready.is_set():
        why = f"the base model failed to load: {state.load_error}" if state.load_error else \
            "the base model is still loading"
        raise APIError(503, why, "server_error", "not_ready")


def caller(state: ServerState, request: Request):
    """The caller's key record (None on an open server); 401 when it has none that works."""
    authorization = request.headers.get("authorization")
    if not authorization and request.headers.get("x-hatrack-ui") and request.cookies.get(UI_COOKIE):
        # the dashboard's "try it": its signed-in key rides in an HttpOnly SameSite=Strict cookie;
        # a custom header cannot be sent cross-site without CORS, which this server never grants
        authorization = f"Bearer {request.cookies[UI_COOKIE]}"
    try:
        return state.gate.caller(authorization)
    except Unauthorized as err:
        raise APIError(401, str(err), "invalid_request_error", "invalid_api_key") from None


async def target_for(state: ServerState, model: str, request: Request) -> Target:
    """The caller's key (401), a loaded base (503), then the name (404 / 400), in that order."""
    key = caller(state, request)
    require_ready(state)
    try:
        target = await run_in_threadpool(state.catalog.lookup, model, lambda n: state.gate.allows(key, n))
    except ModelNotFound:
        raise model_not_found(model) from None
    except BaseMismatch as err:
        raise bad_request(str(err), "model", "base_mismatch") from None
    if target.adapter is not None and not state.notice.seen(target.label):
        await run_in_threadpool(state.notice.check, target.resolved)
    return target


# ------------------------------------------------------------ handlers


async def health() -> dict:
    return {"status": "ok"}


async def ready(state: ServerState = State) -> JSONResponse:
    if state.ready.is_set():
        return JSONResponse({"status": "ready", "base": state.catalog.base_name})
    body = error_body(state.load_error or "the base model is still loading", "server_error", "not_ready")
    return JSONResponse(body, status_code=503)


async def metrics(request: Request, state: ServerState = State) -> Response:
    key = caller(state, request)
    if state.engine is not None:
        state.metrics.refresh_from(state.engine.stats())
        await run_in_threadpool(lambda: state.metrics.forget_models_except(state.catalog.live_labels()))
    base = state.catalog.base_name if state.catalog else None
    visible = None if key is None else (lambda label: label == base or state.gate.allows(key, label))
    return Response(state.metrics.render(visible), media_type="text/plain; version=0.0.4")


async def list_models(request: Request, state: ServerState = State) -> dict:
    key = caller(state, request)
    require_ready(state)
    data = await run_in_threadpool(state.catalog.listing, lambda n: state.gate.allows(key, n))
    return {"object": "list", "data": data}


async def get_model(model: str, request: Request, state: ServerState = State) -> dict:
    target = await target_for(state, model, request)
    item = {"id": model, "object": "model", "created": 0, "owned_by": "hatrack"}
    if target.adapter is not None:
        item["parent"] = state.catalog.base_name
    return item


async def chat(body: ChatCompletionRequest, request: Request, state: ServerState = State):
    target = await target_for(state, body.model, request)
    messages = [m.as_template_message() for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt_ids = await run_in_threadpool(_chat_prompt_ids, state.tokenizer, messages, tools)
    return await _run(state, CHAT, body, request, target, prompt_ids)


async def completions(body: CompletionRequest, request: Request, state: ServerState = State):
    target = await target_for(state, body.model, request)
    # a prompt of megabytes takes a while to tokenize: not on the event loop
    prompt_ids = await run_in_threadpool(_text_prompt_ids, state.tokenizer, body.prompt)
    if not prompt_ids:
        raise bad_request("the prompt is empty", TEXT.prompt_param)
    return await _run(state, TEXT, body, request, target, prompt_ids)


async def _run(state: ServerState, kind: Kind, body, request: Request, target: Target, prompt_ids: list[int]):
    engine = state.engine
    params = sampling_params(body, len(prompt_ids), engine.context_length,
                             state.config.default_max_tokens, state.stop_ids, kind.prompt_param,
                             vocab=engine.runner.vocab_size, max_rows=engine.max_batch)
    grammar = request_grammar_or_400(body)
    if grammar is not None:
        params.constraint = await run_in_threadpool(_compile, state, grammar, body)
    job = Job(kind=kind, target=target, prompt_ids=prompt_ids, params=params, stops=body.stop,
              stream=bool(body.stream), include_usage=body.include_usage, n=body.n_value,
              logprobs=body.logprob_count, tool_calls=wants_tool_calls(body))
    return await Runner(state.engine, state.tokenizer, state.metrics).respond(job, request)


def _grammar_param(body) -> str:
    return "tools" if getattr(body, "tools", None) else "response_format"


def request_grammar_or_400(body) -> str | None:
    try:
        return request_grammar(body)
    except GrammarError as err:
        raise bad_request(f"the JSON schema cannot be used: {err}", _grammar_param(body), "invalid_schema") from None


def _compile(state: ServerState, grammar: str, body):
    """The per-row constraint factory of a grammar (compiled once per server); 400 when
    the grammar engine cannot compile it."""
    try:
        return state.grammars().compile(grammar)
    except GrammarError as err:
        raise bad_request(f"the JSON schema cannot be used: {err}", _grammar_param(body), "invalid_schema") from None


def _chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    try:
        text = render_chat(tokenizer, messages, tools, add_generation_prompt=True)
    except Exception as err:  # template errors (e.g. roles the template forbids)
        reason = strip_paths(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise bad_request(f"messages cannot be rendered with this model's chat template: {reason}",
                          CHAT.prompt_param) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------ mounting


def install_routes(app: FastAPI) -> None:
    # documents the bearer key in /openapi.json; the check itself is KeyGate's
    bearer = [Depends(HTTPBearer(auto_error=False,
                                 description="A key from `hatrack keys create` (not needed with `serve --no-auth`)"))]
    completion_errors = errors(400, 401, 404, 413, 422, 429, 503)
    app.get("/health", response_model=None, responses={200: {"model": Health}})(health)
    app.get("/ready", response_model=None, responses={200: {"model": Ready}, **errors(503)})(ready)
    app.get("/metrics", response_class=Response, dependencies=bearer,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format; with keys, only the series of "
                                            "models the key may use"}, **errors(401)})(metrics)
    app.get("/v1/models", response_model=None, dependencies=bearer,
            responses={200: {"model": ModelList}, **errors(401, 503)})(list_models)
    app.get("/v1/models/{model:path}", response_model=None, dependencies=bearer,
            responses={200: {"model": ModelCard}, **errors(400, 401, 404, 503)})(get_model)
    app.post("/v1/chat/completions", response_model=None, dependencies=bearer,
             responses={**completion_ok(ChatCompletion, ChatCompletionChunk), **completion_errors})(chat)
    app.post("/v1/completions", response_model=None, dependencies=bearer,
             responses={**completion_ok(TextCompletion, TextCompletionChunk), **completion_errors})(completions)
