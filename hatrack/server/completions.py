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
from hatrack.server.engine.errors import (
    EngineMemoryError,
    EngineStoppedError,
    KVBudgetError,
    PromptTooLongError,
    QueueFullError,
)
from hatrack.server.choices import Choice, Piece, merged, next_event
from hatrack.server.errors import APIError, bad_request, strip_paths
from hatrack.server.logprobs import TokenTexts, chat_logprobs, text_logprobs
from hatrack.server.schemas import new_id, now, usage
from hatrack.server.structured import ToolCallStream, read_answer


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
    n: int = 1  # choices answered (params.n rows run: more with best_of)
    logprobs: int | None = None  # None: the answer carries no logprobs
    tool_calls: bool = False  # the answer may hold tool calls to read back (chat with tools)

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
                    stop_ids: tuple[int, ...], prompt_param: str = "messages", *,
                    vocab: int | None = None, max_rows: int | None = None) -> SamplingParams:
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
    bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    outside = next((k for k in bias if vocab is not None and k >= vocab), None)
    if outside is not None:
        raise bad_request(f"logit_bias names token {outside}; this model's token ids are 0..{vocab - 1}",
                          "logit_bias", "invalid_value")
    rows = body.rows
    if max_rows is not None and rows > max_rows:
        param = "best_of" if getattr(body, "best_of", None) else "n"
        raise bad_request(f"{param} is {rows}; this server decodes at most {max_rows} sequences together "
                          f"(serve --max-batch)", param, "invalid_value")
    # ranking best_of candidates needs each token's logprob, asked for or not
    logprobs = body.logprob_count
    if logprobs is None and rows > body.n_value:
        logprobs = 0
    # a vanishing temperature or top_p ("the most likely token") is the sampler's to handle
    return SamplingParams(
        max_tokens=limit, temperature=body.temperature_value, top_p=body.top_p_value,
        seed=body.seed, stop_token_ids=stop_ids, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=bias or None, logprobs=logprobs, n=rows,
    )


class Runner:
    """Runs jobs on the engine and records metrics."""

    def __init__(self, engine, tokenizer, metrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.texts = TokenTexts(tokenizer)

    def submit(self, job: Job):
        try:
            return self.engine.submit_choices(job.prompt_ids, job.target.adapter, job.params)
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
        handles = self.submit(job)
        iters = [h.__aiter__() for h in handles]
        firsts = [await next_event(it) for it in iters]
        failed = next((f for f in firsts if f is not None and f.error is not None), None)
        if failed is not None:
            for handle in handles:
                handle.cancel()
            _raise_if_out_of_room(failed.error)
            if job.target.adapter is not None and isinstance(failed.error, HatrackError):
                # the adapter's stored artifact is unusable: this model's fault, not the server's
                self._count(job, 422)
                raise APIError(
                    422, f"model '{job.target.label}' cannot be loaded: {_short(failed.error)}",
                    "invalid_request_error", "adapter_unavailable", "model",
                )
            self._count(job, 500)
            raise APIError(500, "generation failed", "server_error", "generation_failed")
        self.metrics.ttft.labels(model=job.target.label).observe(time.perf_counter() - started)
        choices = [Choice(i, self.tokenizer, job.stops, h) for i, h in enumerate(handles)]
        events = merged(handles, firsts, iters)
        if job.stream:
            body = self._stream(job, choices, events, started)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers=response_headers(job.target))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
        try:
            async for i, event in events:
                if event.error is not None:
                    _raise_if_out_of_room(event.error)
                choices[i].push(event)
                if choices[i].failed:
                    raise APIError(500, "generation failed", "server_error", "generation_failed")
        finally:
            watcher.cancel()
            await events.aclose()
            for handle in handles:
                handle.cancel()
        count = sum(c.count for c in choices)
        self._done(job, started, count, 200)
        return JSONResponse(self._final_body(job, choices, handles[0].prompt_tokens, count),
                            headers=response_headers(job.target))

    async def _stream(self, job: Job, choices: list[Choice], events, started) -> AsyncIterator[bytes]:
        rid = new_id("chatcmpl" if job.chat else "cmpl")
        created = now()
        calls = [ToolCallStream() if job.tool_calls else None for _ in choices]
        try:
            if job.chat:
                for choice in choices:
                    yield _sse(self._chunk(job, rid, created, choice, Piece(), {"role": "assistant", "content": ""}))
            async for i, event in events:
                choice, tool_stream = choices[i], calls[i]
                piece = choice.push(event)
                if tool_stream is None:
                    if piece.text or piece.logprobs:
                        yield _sse(self._chunk(job, rid, created, choice, piece))
                else:
                    deltas = tool_stream.push(piece.text)
                    if piece.ended:
                        deltas += tool_stream.finish()
                    for n, delta in enumerate(deltas):  # the logprobs ride with the first delta
                        carried = Piece(logprobs=piece.logprobs if n == 0 else [])
                        yield _sse(self._chunk(job, rid, created, choice, carried, delta))
                    if not deltas and piece.logprobs:
                        yield _sse(self._chunk(job, rid, created, choice, Piece(logprobs=piece.logprobs), {}))
                if piece.ended:
                    finish = choice.finish
                    if tool_stream is not None and tool_stream.calls and finish == "stop":
                        finish = "tool_calls"
                    yield _sse(self._chunk(job, rid, created, choice, Piece(), finish=finish))
            if job.include_usage:
                body = self._chunk_base(job, rid, created)
                body["choices"] = []
                body["usage"] = usage(choices[0].handle.prompt_tokens, sum(c.count for c in choices))
                yield _sse(body)
            yield b"data: [DONE]\n\n"
            self._done(job, started, sum(c.count for c in choices), 200)
        finally:
            # client gone (generator closed) or finished: free the batch rows either way
            await events.aclose()
            for choice in choices:
                choice.handle.cancel()

    def _chunk_base(self, job: Job, rid: str, created: int) -> dict:
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": job.target.label}

    def _logprobs(self, job: Job, entries) -> dict | None:
        if job.logprobs is None:
            return None
        return chat_logprobs(entries, self.texts) if job.chat else text_logprobs(entries, self.texts)

    def _chunk(self, job: Job, rid: str, created: int, choice: Choice, piece: Piece,
               delta: dict | None = None, finish: str | None = None) -> dict:
        body = self._chunk_base(job, rid, created)
        logprobs = self._logprobs(job, piece.logprobs) if piece.logprobs else None
        if job.chat:
            if delta is None:
                delta = {"content": piece.text} if piece.text or finish is None else {}
            body["choices"] = [{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        else:
            body["choices"] = [{"index": choice.index, "text": piece.text, "logprobs": logprobs,
                                "finish_reason": finish}]
        return body

    def _final_body(self, job: Job, choices: list[Choice], prompt_tokens: int, count: int) -> dict:
        if len(choices) > job.n:  # best_of: the n with the highest cumulative logprob
            choices = sorted(choices, key=lambda c: c.cumulative, reverse=True)[: job.n]
        out = []
        for index, choice in enumerate(choices):
            logprobs = self._logprobs(job, choice.kept)
            finish = choice.finish or "stop"
            if job.chat:
                message: dict = {"role": "assistant", "content": choice.text}
                if job.tool_calls:
                    message["content"], calls = read_answer(choice.text)
                    if calls:
                        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
                        if finish == "stop":
                            finish = "tool_calls"
                out.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                out.append({"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": finish})
        obj, rid = ("chat.completion", new_id("chatcmpl")) if job.chat else ("text_completion", new_id("cmpl"))
        return {"id": rid, "object": obj, "created": now(), "model": job.target.label,
                "choices": out, "usage": usage(prompt_tokens, count)}

    def _done(self, job: Job, started: float, tokens: int, status: int) -> None:
        label = job.target.label
        self.metrics.latency.labels(model=label).observe(time.perf_counter() - started)
        self.metrics.tokens.labels(model=label).inc(tokens)
        self._count(job, status)

    def _count(self, job: Job, status: int) -> None:
        self.metrics.requests.labels(endpoint=job.kind.endpoint, model=job.target.label, status=str(status)).inc()


async def _cancel_on_disconnect(request: Request, handles) -> None:
    while True:
        if await request.is_disconnected():
            for handle in handles:
                handle.cancel()
            return
        await asyncio.sleep(0.25)


def _raise_if_out_of_room(error: BaseException) -> None:
    """The KV cache or the device memory ran out for this request: say so (503, retry
    later), not a bare 500, nor a 422 blaming the adapter."""
    if isinstance(error, KVBudgetError):
        raise APIError(503, str(error), "server_error", "kv_cache_full")
    if isinstance(error, EngineMemoryError):
        raise APIError(503, strip_paths(str(error)), "server_error", "out_of_memory")


def _short(err: BaseException) -> str:
    """The error's own one-line message, without paths."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return strip_paths(text)


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
