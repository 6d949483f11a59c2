"""One OpenAI completion request, from validated body to response: prompt tokens,
limits, the engine run, stop sequences, streaming and usage."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from hatrack.errors import HatrackError
from hatrack.server.catalog import Target
from hatrack.server.engine import SamplingParams
from hatrack.server.engine.errors import EngineStoppedError, KVBudgetError, PromptTooLongError, QueueFullError
from hatrack.server.errors import APIError, bad_request, strip_paths
from hatrack.server.schemas import new_id, now, usage
from hatrack.server.textstream import TextStream


@dataclass(frozen=True)
class Kind:
    """What differs between the two completion routes, named in one place."""

    name: str  # "chat" or "text": the shape of the answer
    prompt_param: str  # the request field holding the prompt, as errors name it
    endpoint: str  # the `endpoint` label of hatrack_requests_total


CHAT = Kind("chat", "messages", "chat")
TEXT = Kind("text", "prompt", "completions")


@dataclass
class Job:
    """What the engine needs, plus how to shape the answer."""

    kind: Kind
    target: Target
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool

    @property
    def prompt_param(self) -> str:
        return self.kind.prompt_param

    @property
    def chat(self) -> bool:
        return self.kind.name == "chat"


def response_headers(target: Target) -> dict[str, str]:
    """Every answer says which version answered it, so a client or router can audit it:
    an adapter's artifact sha256, or for the base its fingerprint."""
    digest = target.resolved.sha256 if target.adapter is not None else target.resolved.base_fingerprint
    return {"X-Hatrack-Model": target.label, "X-Hatrack-Artifact-Sha256": digest}


def sampling_params(body, prompt_len: int, context: int, default_max: int,
                    stop_ids: tuple[int, ...], prompt_param: str = "messages") -> SamplingParams:
    room = context - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt is {prompt_len} tokens; this model's context is {context} tokens",
            prompt_param, "context_length_exceeded",
        )
    limit, limit_param = body.token_limit()
    if limit is None:
        limit = min(default_max, room)
    elif limit > room:
        raise bad_request(
            f"{limit_param} is {limit} but the prompt ({prompt_len} tokens) leaves room for only "
            f"{room} of this model's {context}-token context",
            limit_param, "context_length_exceeded",
        )
    # a vanishing temperature or top_p ("the most likely token") is the sampler's to handle
    return SamplingParams(
        max_tokens=limit, temperature=body.temperature_value, top_p=body.top_p_value,
        seed=body.seed, stop_token_ids=stop_ids,
    )


class Runner:
    """Runs jobs on the engine and records metrics."""

    def __init__(self, engine, tokenizer, metrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics

    def submit(self, job: Job):
        try:
            return self.engine.submit(job.prompt_ids, job.target.adapter, job.params)
        except QueueFullError:
            raise APIError(429, "the server is busy: too many requests waiting; retry later",
                           "rate_limit_error", "queue_full") from None
        except EngineStoppedError:
            raise APIError(503, "the server is shutting down", "server_error", "not_ready") from None
        except PromptTooLongError as err:
            raise bad_request(str(err), job.prompt_param, "context_length_exceeded") from None
        except KVBudgetError as err:
            raise bad_request(str(err), "max_tokens", "kv_cache_budget_exceeded") from None
        except HatrackError as err:
            raise bad_request(strip_paths(str(err)), None, "invalid_value") from None

    async def respond(self, job: Job, request: Request):
        started = time.perf_counter()
        handle = self.submit(job)
        events = handle.__aiter__()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        if first is not None and first.error is not None:
            _raise_if_kv_full(first.error)
            if job.target.adapter is not None and isinstance(first.error, HatrackError):
                # the adapter's stored artifact is unusable: this model's fault, not the server's
                self._count(job, 422)
                raise APIError(
                    422, f"model '{job.target.label}' cannot be loaded: {_short(first.error)}",
                    "invalid_request_error", "adapter_unavailable", "model",
                )
            self._count(job, 500)
            raise APIError(500, "generation failed", "server_error", "generation_failed")
        self.metrics.ttft.labels(model=job.target.label).observe(time.perf_counter() - started)
        if job.stream:
            body = self._stream(job, handle, first, events, started)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers=response_headers(job.target))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            text, finish, completion_tokens = await self._collect(job, handle, first, events)
        finally:
            watcher.cancel()
        self._done(job, started, completion_tokens, 200)
        return JSONResponse(self._final_body(job, text, finish, handle.prompt_tokens, completion_tokens),
                            headers=response_headers(job.target))

    async def _collect(self, job: Job, handle, first, events):
        stream = TextStream(self.tokenizer, job.stops)
        finish = "length"
        count = 0
        event = first
        while event is not None:
            if event.error is not None:
                _raise_if_kv_full(event.error)
                raise APIError(500, "generation failed", "server_error", "generation_failed")
            if event.token_id is not None:
                count += 1
                stream.push(event.token_id)
                if stream.stopped:
                    handle.cancel()
                    finish = "stop"
                    break
            if event.finish_reason is not None:
                finish = "stop" if event.finish_reason == "stop" else event.finish_reason
                break
            event = await _next(events)
        stream.finish()
        return stream.full_text(), _openai_finish(finish), count

    async def _stream(self, job: Job, handle, first, events, started) -> AsyncIterator[bytes]:
        rid = new_id("chatcmpl" if job.chat else "cmpl")
        created = now()
        stream = TextStream(self.tokenizer, job.stops)
        count = 0
        finish = "length"
        try:
            if job.chat:
                yield _sse(self._chunk(job, rid, created, {"role": "assistant", "content": ""}, None))
            event = first
            while event is not None:
                if event.error is not None:
                    finish = "error"
                    break
                if event.token_id is not None:
                    count += 1
                    delta = stream.push(event.token_id)
                    if delta:
                        yield _sse(self._chunk(job, rid, created, delta, None))
                    if stream.stopped:
                        handle.cancel()
                        finish = "stop"
                        break
                if event.finish_reason is not None:
                    finish = event.finish_reason
                    break
                event = await _next(events)
            tail = stream.finish()
            if tail:
                yield _sse(self._chunk(job, rid, created, tail, None))
            yield _sse(self._chunk(job, rid, created, "" if not job.chat else {}, _openai_finish(finish)))
            if job.include_usage:
                body = self._chunk_base(job, rid, created)
                body["choices"] = []
                body["usage"] = usage(handle.prompt_tokens, count)
                yield _sse(body)
            yield b"data: [DONE]\n\n"
            self._done(job, started, count, 200)
        finally:
            # client gone (generator closed) or finished: free the batch row either way
            handle.cancel()

    def _chunk_base(self, job: Job, rid: str, created: int) -> dict:
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": job.target.label}

    def _chunk(self, job: Job, rid: str, created: int, delta, finish: str | None) -> dict:
        body = self._chunk_base(job, rid, created)
        if job.chat:
            if isinstance(delta, str):
                delta = {"content": delta}
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            body["choices"] = [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]
        return body

    def _final_body(self, job: Job, text: str, finish: str, prompt_tokens: int, count: int) -> dict:
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            obj, rid = "chat.completion", new_id("chatcmpl")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj, rid = "text_completion", new_id("cmpl")
        return {"id": rid, "object": obj, "created": now(), "model": job.target.label,
                "choices": [choice], "usage": usage(prompt_tokens, count)}

    def _done(self, job: Job, started: float, tokens: int, status: int) -> None:
        label = job.target.label
        self.metrics.latency.labels(model=label).observe(time.perf_counter() - started)
        self.metrics.tokens.labels(model=label).inc(tokens)
        self._count(job, status)

    def _count(self, job: Job, status: int) -> None:
        self.metrics.requests.labels(endpoint=job.kind.endpoint, model=job.target.label, status=str(status)).inc()


async def _next(events):
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _cancel_on_disconnect(request: Request, handle) -> None:
    while True:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.25)


def _raise_if_kv_full(error: BaseException) -> None:
    """The KV cache ran out mid-answer: say so (503, retry later), not a bare 500."""
    if isinstance(error, KVBudgetError):
        raise APIError(503, str(error), "server_error", "kv_cache_full")


def _openai_finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop" if reason == "cancelled" else reason)


def _short(err: BaseException) -> str:
    """The error's own one-line message, without paths."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return strip_paths(text)


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
