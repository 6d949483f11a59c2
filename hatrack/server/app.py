"""The FastAPI app of `hatrack serve`: routes, start-up and shutdown.

The base model loads on a background thread so /health answers at once and /ready
says when the model is there; /v1 calls get 503 until then.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

from hatrack import settings
from hatrack.chat_format import end_of_turn_ids, load_generation_config
from hatrack.precision import default_serving_quantize, precision_label
from hatrack.registry import Registry
from hatrack.server.auth import KeyGate, Unauthorized
from hatrack.server.catalog import BaseMismatch, Catalog, ModelNotFound, Target
from hatrack.server.completions import Job, Runner, sampling_params
from hatrack.server.errors import APIError, bad_request, install_error_handlers, model_not_found, strip_paths
from hatrack.server.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, JSONBodyRoute
from hatrack.server.metrics import ServerMetrics
from hatrack.server.precision_notice import PrecisionNotice
from hatrack.server.openapi import (
    ChatCompletion, ChatCompletionChunk, Health, ModelCard, ModelList, Ready, TextCompletion,
    TextCompletionChunk, completion_ok, errors, install_openapi,
)
from hatrack.server.schemas import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("hatrack.server")


@dataclass
class ServeConfig:
    base: str = settings.DEFAULT_BASE_NAME
    quantize: str = "auto"  # auto | nf4 | int8 | none; auto: the device's serving default, resolved at load
    device: str | None = None  # default: cuda if available, else cpu
    max_rank: int | None = None  # largest LoRA rank served; None: settings.max_rank()
    max_loaded: int = 8  # adapters in device slots
    max_host: int = 64  # adapters kept in host memory
    max_batch: int = 32
    max_waiting: int = 256
    max_context: int | None = None
    default_max_tokens: int = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    auth: bool = True  # False: open to anyone, no key (`--no-auth`); chosen here, never inferred
    shutdown_timeout: float = 30.0
    engine_options: dict[str, Any] = field(default_factory=dict)


class ServerState:
    def __init__(self, config: ServeConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.metrics = ServerMetrics()
        self.gate = KeyGate(registry, open_access=not config.auth)
        self.engine = None
        self.tokenizer = None
        self.catalog: Catalog | None = None
        self.notice: PrecisionNotice | None = None
        self.stop_ids: tuple[int, ...] = ()
        self.load_error: str | None = None
        self.ready = threading.Event()

    def load(self) -> None:
        """Load the base and start the engine (runs on a background thread)."""
        try:
            from hatrack import basemodel
            from hatrack.server.engine import Engine

            record = basemodel.ensure_base(self.registry, self.config.base)
            device = self.config.device or basemodel.best_device()
            quantize = resolve_quantize(self.config.quantize, device)
            max_rank = self.config.max_rank or settings.max_rank()
            model, tokenizer = basemodel.load_base(record.path, quantize=quantize, device=device)
            engine = Engine(
                model, tokenizer, max_loaded=self.config.max_loaded, max_host=self.config.max_host,
                max_batch=self.config.max_batch, max_context=self.config.max_context,
                max_waiting=self.config.max_waiting, max_rank=max_rank, **self.config.engine_options,
            )
            engine.start()
            # the base's own end tokens: tokenizer eos, generation config eos, the template's end of turn
            self.stop_ids = tuple(sorted(end_of_turn_ids(tokenizer, load_generation_config(record.path))))
            precision = precision_label(quantize, model.dtype)
            self.notice = PrecisionNotice(self.registry, precision)
            self.catalog = Catalog(self.registry, record.name, record.fingerprint)
            self.tokenizer, self.engine = tokenizer, engine
            self.ready.set()
            log.info("ready: base %s (fingerprint %s), device %s, precision %s, max rank %d, auth %s, "
                     "LoRA decode on %s", record.name, record.fingerprint[:12], engine.device, precision,
                     max_rank, "keys" if self.config.auth else "open (--no-auth)", engine.lora_backend)
        except Exception as err:  # reported by /ready and every /v1 call
            self.load_error = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.error("base model failed to load: %s", self.load_error)


def resolve_quantize(quantize: str, device: str) -> str:
    """`auto` is the serving default of the device the base runs on."""
    return default_serving_quantize(device) if quantize == "auto" else quantize


def _warn_if_keyed_without_keys(state: ServerState) -> None:
    if not state.config.auth:
        return
    try:
        has_keys = state.registry.has_keys()
    except Exception:  # the registry's own errors surface on the first request
        return
    if not has_keys:
        log.warning("no API keys exist yet: every /v1 call is refused (401) until one is created with "
                    "`hatrack keys create --tenant T --allow PATTERN`, or restart with --no-auth to serve "
                    "without keys")


def create_app(config: ServeConfig | None = None, registry: Registry | None = None) -> FastAPI:
    config = config or ServeConfig()
    state = ServerState(config, registry or Registry())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        _warn_if_keyed_without_keys(state)
        threading.Thread(target=state.load, name="hatrack-load", daemon=True).start()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop, config.shutdown_timeout)

    app = FastAPI(title="hatrack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over one base model and its LoRA adapters.")
    app.router.route_class = JSONBodyRoute
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.state.hatrack = state
    install_error_handlers(app)
    install_openapi(app)
    # documents the bearer key in /openapi.json; the check itself is KeyGate's
    bearer = Depends(HTTPBearer(auto_error=False, description="A key from `hatrack keys create` (not needed with `serve --no-auth`)"))

    def require_ready() -> None:
        if not state.ready.is_set():
            why = f"the base model failed to load: {state.load_error}" if state.load_error else \
                "the base model is still loading"
            raise APIError(503, why, "server_error", "not_ready")

    def caller(request: Request):
        try:
            return state.gate.caller(request.headers.get("authorization"))
        except Unauthorized as err:
            raise APIError(401, str(err), "invalid_request_error", "invalid_api_key") from None

    async def target_for(model: str, request: Request) -> Target:
        """The caller's key (401), a loaded base (503), then the name (404 / 400), in that order."""
        key = caller(request)
        require_ready()
        try:
            target = await run_in_threadpool(state.catalog.lookup, model, lambda n: state.gate.allows(key, n))
        except ModelNotFound:
            raise model_not_found(model) from None
        except BaseMismatch as err:
            raise bad_request(str(err), "model", "base_mismatch") from None
        if target.adapter is not None and not state.notice.seen(target.label):
            await run_in_threadpool(state.notice.check, target.resolved)
        return target

    @app.get("/health", response_model=None, responses={200: {"model": Health}})
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", response_model=None, responses={200: {"model": Ready}, **errors(503)})
    async def ready() -> JSONResponse:
        if state.ready.is_set():
            return JSONResponse({"status": "ready", "base": state.catalog.base_name})
        body = error_body(state.load_error or "the base model is still loading", "server_error", "not_ready")
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", response_class=Response, dependencies=[bearer],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format; with keys, only the series of "
                                             "models the key may use"}, **errors(401)})
    async def metrics(request: Request) -> Response:
        key = caller(request)
        if state.engine is not None:
            state.metrics.refresh_from(state.engine.stats())
            await run_in_threadpool(lambda: state.metrics.forget_models_except(state.catalog.live_labels()))
        base = state.catalog.base_name if state.catalog else None
        visible = None if key is None else (lambda label: label == base or state.gate.allows(key, label))
        return Response(state.metrics.render(visible), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=None, dependencies=[bearer],
             responses={200: {"model": ModelList}, **errors(401, 503)})
    async def list_models(request: Request) -> dict:
        key = caller(request)
        require_ready()
        data = await run_in_threadpool(state.catalog.listing, lambda n: state.gate.allows(key, n))
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}", response_model=None, dependencies=[bearer],
             responses={200: {"model": ModelCard}, **errors(400, 401, 404, 503)})
    async def get_model(model: str, request: Request) -> dict:
        target = await target_for(model, request)
        item = {"id": model, "object": "model", "created": 0, "owned_by": "hatrack"}
        if target.adapter is not None:
            item["parent"] = state.catalog.base_name
        return item

    completion_errors = errors(400, 401, 404, 413, 422, 429, 503)

    @app.post("/v1/chat/completions", response_model=None, dependencies=[bearer],
              responses={**completion_ok(ChatCompletion, ChatCompletionChunk), **completion_errors})
    async def chat(body: ChatCompletionRequest, request: Request):
        target = await target_for(body.model, request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = await run_in_threadpool(_chat_prompt_ids, state.tokenizer, messages)
        return await _run(body, request, target, prompt_ids, "chat")

    @app.post("/v1/completions", response_model=None, dependencies=[bearer],
              responses={**completion_ok(TextCompletion, TextCompletionChunk), **completion_errors})
    async def completions(body: CompletionRequest, request: Request):
        target = await target_for(body.model, request)
        # a prompt of megabytes takes a while to tokenize: not on the event loop
        prompt_ids = await run_in_threadpool(_text_prompt_ids, state.tokenizer, body.prompt)
        if not prompt_ids:
            raise bad_request("the prompt is empty", "prompt")
        return await _run(body, request, target, prompt_ids, "text")

    async def _run(body, request: Request, target: Target, prompt_ids: list[int], kind: str):
        params = sampling_params(body, len(prompt_ids), state.engine.context_length,
                                 config.default_max_tokens, state.stop_ids,
                                 "messages" if kind == "chat" else "prompt")
        job = Job(kind=kind, target=target, prompt_ids=prompt_ids, params=params, stops=body.stop,
                  stream=bool(body.stream), include_usage=body.include_usage)
        runner = Runner(state.engine, state.tokenizer, state.metrics,
                        "chat" if kind == "chat" else "completions")
        return await runner.respond(job, request)

    return app


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # template errors (e.g. roles the template forbids)
        reason = strip_paths(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise bad_request(f"messages cannot be rendered with this model's chat template: {reason}",
                          "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]
