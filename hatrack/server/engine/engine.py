"""The Engine: continuous batching of many requests, each with its own adapter or
none, over one base model, on a background scheduler thread.

Each scheduler iteration admits waiting requests (prefilling each one, which yields
its first token), then runs one decode step over every running sequence; finished and
cancelled sequences leave at once, so a short request never waits for a long one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from hatrack import settings
from hatrack.server.engine.adapters import AdapterCache
from hatrack.server.engine.errors import (
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    memory_error,
)
from hatrack.server.engine.handle import RequestHandle
from hatrack.server.engine.model import LlamaRunner, PrefillSegment
from hatrack.server.engine.prefix_cache import PREFILL_CHUNK, PrefixCache
from hatrack.server.engine.sampling import RowSampler, TokenLogprobs, check_knobs, pick_tokens
from hatrack.server.engine.shared_prompts import SharedPrompts
from hatrack.server.engine import cpu_kernel as cpu_kernel_module
from hatrack.server.engine.slots import KernelRows, LoraRows, RowBank, SlotBank, lora_dtype_for
from hatrack.server.engine.threads import on_passing_thread
from hatrack.server.engine.types import AdapterSpec, EngineStats, SamplingParams, TokenEvent

log = logging.getLogger("hatrack.engine")

PREFILL_TOKEN_BUDGET = 2048  # prompt tokens prefilled per iteration before decoding again
# prompt tokens per prefill forward: on CPU a forward of ~256 tokens is about as efficient
# per token as one of thousands (measured: 32 prompts of 40 tokens in 4 forwards took 1.1-1.2x
# the time of one forward), and its prompts get their first token a forward sooner
PREFILL_FORWARD_TOKENS = 2 * PREFILL_CHUNK
DEFAULT_PREFIX_CACHE_BYTES = 10**9  # at most; and at most a quarter of the KV cache budget


@dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    adapter: AdapterSpec | None
    params: SamplingParams
    stop_ids: frozenset[int]
    sampler: RowSampler | None = None  # built at admission
    others: list[RequestHandle] = field(default_factory=list)  # choices 1..n-1, until the prefill
    slot: int = 0
    row: int = 0  # cache row (while prefilling; then the index in the running batch)
    length: int = 0  # positions in the KV cache
    generated: int = 0
    last: int = 0  # the token to feed at the next decode step
    admitted: bool = False  # prefilled (no longer counted as queued)
    wanting: bool = False  # counted in the adapter cache's wanted set
    submitted: float = field(default_factory=time.monotonic)
    share_key: tuple | None = None  # set while it may own its prompt for others (shared_prompts.py)
    source: "_Sequence | None" = None  # the request whose prefill this one copies, until it has
    first_logits: torch.Tensor | None = None  # its prompt's last logits, once prefilled


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_loaded: int = 8,
        max_host: int = 64,
        max_batch: int = 32,
        max_context: int | None = None,
        max_rank: int | None = None,
        max_waiting: int = 256,
        cpu_kernel: bool = True,
        kv_cache_bytes: int | None = None,
        prefix_cache_bytes: int | None = None,
        prefill_budget: int = PREFILL_TOKEN_BUDGET,
    ):
        """cpu_kernel: on CPU, use the compiled LoRA decode kernel where it can be built
        (False: torch ops only). max_rank: the largest LoRA rank the slots hold; None
        takes HATRACK_MAX_RANK (default 64), the limit `register` holds adapters to.
        kv_cache_bytes: the KV cache budget; None: half the memory available at start
        (free device memory on CUDA), at most what every row at the full context needs.
        prefix_cache_bytes: memory for cached prompt prefixes, besides the KV cache; None:
        a quarter of the KV cache budget, at most 1 GB; 0: no prefix cache.
        prefill_budget: prompt tokens prefilled per iteration before the running answers
        decode their next token (a longer prompt is prefilled over several iterations)."""
        max_rank = settings.max_rank() if max_rank is None else max_rank
        if max_loaded < 1 or max_batch < 1 or max_rank < 1 or max_waiting < 1:
            raise EngineError("max_loaded, max_batch, max_rank and max_waiting must be at least 1")
        if prefill_budget < PREFILL_CHUNK:
            raise EngineError(f"prefill_budget must be at least one chunk ({PREFILL_CHUNK} tokens)")
        self.prefill_budget = prefill_budget
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        # start-up work on a thread that exits: it leaves no OpenMP pool beside the engine's (threads.py)
        self.runner = on_passing_thread(lambda: LlamaRunner(
            model, max_batch=max_batch, max_context=max_context, kv_cache_bytes=kv_cache_bytes,
            # a fused step: the running rows and a budget's prompt tokens in one forward
            max_forward_rows=max_batch + prefill_budget, cpu_kernel=cpu_kernel))
        self.kv = self.runner.kv
        if prefix_cache_bytes is None:
            prefix_cache_bytes = min(DEFAULT_PREFIX_CACHE_BYTES, self.kv.budget_bytes // 4)
        self.prefix = PrefixCache(self.kv, prefix_cache_bytes)
        self.shared = SharedPrompts()
        kernel = cpu_kernel_module.load() if cpu_kernel and self.runner.device.type == "cpu" else None
        self.runner.attention_kernel = kernel
        lora_dtype = lora_dtype_for(self.runner.device, self.runner.dtype, cpu_kernel=kernel is not None)
        self.bank = on_passing_thread(
            lambda: SlotBank(self.runner.layers, max_loaded, max_rank, lora_dtype, self.runner.device))
        self.rows: LoraRows = KernelRows(self.bank, kernel) if kernel else RowBank(self.bank, max_batch)
        self.runner.token_lora = self.rows.apply_tokens if kernel else None
        # what the log says runs the per-row LoRA term
        self.lora_backend = "the compiled CPU kernel" if kernel else "torch ops"
        self.cache = AdapterCache(self.bank, max_host, on_ready=self._kick)
        self._cond = threading.Condition()
        self._inbox: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()  # scheduler thread only
        self._running: list[_Sequence] = []  # scheduler thread only; index = cache row
        self._partial: _Sequence | None = None  # scheduler thread only; a long prompt being prefilled
        self._queued = 0  # submitted, not yet admitted or finished (guarded by _cond)
        self._kicked = False
        self._accepting = True
        self._deadline: float | None = None  # set by stop()
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._fused_steps = 0  # steps that also prefilled prompts (_fused_step)
        self._tokens_generated = 0
        self._prefill_tokens = 0
        self._prefill_seconds = 0.0
        self._decode_seconds = 0.0

    # ------------------------------------------------------------ public API

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            threads = torch.get_num_threads()
            self._thread = threading.Thread(target=self._loop, args=(threads,), name="hatrack-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing more; cancel the waiting requests; let running ones finish for
        up to `timeout` seconds, then cancel the rest."""
        with self._cond:
            self._accepting = False
            self._deadline = time.monotonic() + timeout
            self._kicked = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 30.0)
        else:
            self._drain_inbox()
            for seq in list(self._waiting):
                self._finish(seq, "cancelled")
            self._waiting.clear()
        self.cache.shutdown()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(
        self,
        prompt_ids: list[int],
        adapter: AdapterSpec | None,
        params: SamplingParams,
        *,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request; safe from any thread, including an asyncio loop's (it never
        blocks on model work). Raises QueueFullError, PromptTooLongError,
        InvalidRequestError, KVBudgetError (it could never fit the KV cache budget) or
        EngineStoppedError."""
        if params.n != 1:
            raise InvalidRequestError("submit() runs one choice; submit_choices() runs n")
        return self.submit_choices(prompt_ids, adapter, params, request_id=request_id)[0]

    def submit_choices(
        self,
        prompt_ids: list[int],
        adapter: AdapterSpec | None,
        params: SamplingParams,
        *,
        request_id: str | None = None,
    ) -> list[RequestHandle]:
        """Like submit, for params.n choices: the prompt is prefilled once and its cache
        copied into n rows, each sampling on its own; one handle per choice."""
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        self.kv.check_fits(len(prompt), params.max_tokens, self.context_length, rows=params.n)
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        handles = [RequestHandle(rid, len(prompt), self._kick) for _ in range(params.n)]
        seq = _Sequence(
            handle=handles[0],
            prompt=prompt,
            adapter=adapter,
            params=params,
            stop_ids=frozenset(int(t) for t in params.stop_token_ids),
            others=handles[1:],
        )
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the engine is stopping and admits no new requests")
            if self._queued >= self.max_waiting:
                raise QueueFullError(f"the engine's queue is full ({self.max_waiting} requests waiting)")
            self._queued += 1
            self._inbox.append(seq)
            if adapter is not None:
                seq.wanting = True
                self.cache.want(adapter)  # starts a cold adapter loading while the request queues
            self._kicked = True
            self._cond.notify_all()
        return handles

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=self._queued,
            running=len(self._running),
            loaded_adapters=self.cache.loaded_keys(),
            adapter_load_seconds=list(self.cache.load_seconds),
            adapter_loads_total=self.cache.loads_total,
            steps=self._steps,
            fused_steps=self._fused_steps,
            tokens_generated=self._tokens_generated,
            host_adapters=self.cache.host_keys(),
            prefill_tokens=self._prefill_tokens,
            prefill_seconds=self._prefill_seconds,
            decode_seconds=self._decode_seconds,
            prefix_cache_hits=self.prefix.stats.hits,
            prefix_cache_tokens=self.prefix.stats.reused_tokens,
            shared_prompts=self.shared.shared,
        )

    # ------------------------------------------------------------ checks

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidRequestError("prompt is empty: at least one token is needed")
        if len(prompt) + 1 > self.context_length:
            raise PromptTooLongError(
                f"prompt has {len(prompt)} tokens; the context holds {self.context_length}, "
                f"so at most {self.context_length - 1} leave room for an answer"
            )
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
        if not params.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature!r}")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p!r}")
        check_knobs(params, vocab, self.max_batch)

    # ------------------------------------------------------------ scheduler thread

    def _kick(self) -> None:
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def _drain_inbox(self) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()

    def _wait_for_work(self, blocked: bool) -> None:
        """Sleep until something can happen: a submit, a cancel, a finished load, stop().
        `blocked`: requests wait (for a load or a slot) and nothing runs."""
        with self._cond:
            if blocked:
                if not self._kicked:
                    self._cond.wait(timeout=0.5)
            else:
                while not (self._kicked or self._inbox or self._running or self._waiting or self._partial):
                    self._cond.wait()
            self._kicked = False
            self._waiting.extend(self._inbox)
            self._inbox.clear()

    def _loop(self, threads: int) -> None:
        # OpenMP thread counts are per thread: use the starting thread's setting
        torch.set_num_threads(threads)
        blocked = False
        with torch.inference_mode():
            while True:
                self._wait_for_work(blocked)
                if self._deadline is not None and self._shutdown_step():
                    return
                try:
                    self._reap_cancelled()
                    admitted, fresh, budget = self._admit()
                    if not self._fused_step(fresh):
                        if fresh or self._partial is not None:
                            self._prefill(fresh, budget)
                        self._grow_for_decode()
                        if self._running:
                            self._decode_step()
                    blocked = not self._running and not admitted and bool(self._waiting)
                except Exception as exc:  # a bug or out-of-memory: fail what ran, keep serving
                    log.exception("engine step failed")
                    error = memory_error(exc, f"in a decode step of {len(self._running)} rows")
                    for seq in self._running + ([self._partial] if self._partial else []):
                        self._finish(seq, "error", error)
                    self._running.clear()
                    self._partial = None
                    self.shared.clear()
                    self.kv.release_all()

    def _shutdown_step(self) -> bool:
        """While stopping: drop waiting requests; True once nothing runs or time is up."""
        for seq in self._waiting:
            self._finish(seq, "cancelled")
        self._waiting.clear()
        if self._partial is not None:  # not answering yet: like a waiting request
            self._drop_partial("cancelled")
        if self._running and time.monotonic() < self._deadline:
            return False
        for seq in self._running:
            self._finish(seq, "cancelled")
        self._running.clear()
        self.kv.release_all()
        return True

    def _reap_cancelled(self) -> None:
        if any(_all_cancelled(s) for s in self._waiting):
            keep = deque()
            for seq in self._waiting:
                if _all_cancelled(seq):
                    self._finish(seq, "cancelled")
                else:
                    keep.append(seq)
            self._waiting = keep
        if self._partial is not None and _all_cancelled(self._partial):
            self._drop_partial("cancelled")
        done = [i for i, s in enumerate(self._running) if s.handle.cancelled]
        if done:
            for i in done:
                self._finish(self._running[i], "cancelled")
            self._remove_rows(done)

    def _admit(self) -> tuple[int, list[_Sequence], int]:
        """Start waiting requests in arrival order while rows and KV cache are free, to be
        prefilled together. A request whose adapter is still loading (or finds every
        slot pinned) waits without blocking the ones behind it. One whose prompt does not
        fit the free KV cache waits and holds back the ones behind it, so long prompts are
        not starved by short ones. A prompt longer than this iteration's token budget is
        prefilled a few chunks per iteration (the partial one, one at a time), so running
        answers keep decoding meanwhile. A prompt (and adapter) equal to one prefilled
        in this iteration or answering copies that one's prefill (shared_prompts.py) and
        takes none of the budget. A request that fails to start (its adapter, out of
        memory) ends with its error; the others go on. Returns how many requests were
        started or moved on, the started ones to prefill whole (in the cache rows after
        the running ones, in order) and the prompt tokens this iteration's budget leaves."""
        budget = self.prefill_budget
        partial = self._partial
        reserved = self._rows_of(partial) if partial else 0  # the partial's rows, taken when it joins
        if partial is not None:
            budget -= PREFILL_CHUNK  # it moves on by at least a chunk each iteration
        fresh: list[_Sequence] = []
        next_row = len(self._running)
        keep: deque[_Sequence] = deque()
        try:
            while self._waiting:
                seq = self._waiting.popleft()
                rows = self._rows_of(seq)
                busy = next_row + reserved
                if busy + rows > self.max_batch or not self.kv.can_hold(len(seq.prompt), running=busy, rows=rows):
                    keep.append(seq)
                    break
                key = (_prefix_key(seq), tuple(seq.prompt))
                owner = self.shared.owner(key)  # the same prompt is prefilling or answering
                if owner is not None:
                    entry, hit, chunked = None, 0, False
                else:
                    entry, hit = self.prefix.lookup(_prefix_key(seq), seq.prompt)
                    chunked = len(seq.prompt) - hit > budget
                if chunked and self._partial is not None:  # one partial at a time; it goes first
                    keep.append(seq)
                    break
                if seq.adapter is not None:
                    try:
                        got = self.cache.acquire(seq.adapter)
                    except Exception as exc:  # acquire answers its own failures; this one ends only this request
                        log.exception("acquiring the adapter of %s failed", seq.handle.request_id)
                        got = exc
                    if got is None:
                        keep.append(seq)
                        continue
                    self._unwant(seq)
                    if isinstance(got, BaseException):
                        log.warning("request %s: %s", seq.handle.request_id, got)
                        self._finish(seq, "error", got)
                        continue
                    seq.slot = got
                # the partial waits in the last rows until its prompt is in, then joins the batch
                row = self.max_batch - rows if chunked else next_row
                if not self._start(seq, rows, row, entry, hit, fresh):
                    continue
                if chunked:
                    self._partial, reserved = seq, rows
                else:
                    fresh.append(seq)
                    next_row += rows
                    if owner is not None:  # copies the owner's prefill: no prompt tokens to compute
                        seq.source = owner
                    else:
                        budget -= len(seq.prompt) - hit
                        seq.share_key = key
                        self.shared.register(key, seq)
        finally:
            # whatever happened, every request not admitted or finished waits on
            keep.extend(self._waiting)
            self._waiting = keep
        return len(fresh) + (self._partial is not None or partial is not None), fresh, max(budget, 0)

    def _rows_of(self, seq: _Sequence) -> int:
        return 1 + len(seq.others)  # n choices take n rows from one prefill

    def _start(self, seq: _Sequence, rows: int, row: int, entry, hit: int, fresh: list[_Sequence]) -> bool:
        """Give an admitted request its cache row (and the cached prefix of its prompt);
        False if that failed, and then the request has ended with the error and given
        its cache back."""
        what = "preparing the per-row adapter copies"
        try:
            if seq.slot:  # the row copies grow here (a larger rank, more rows), not in the next decode
                slots = [s.slot for s in self._running] + [s.slot for s in fresh for _ in range(self._rows_of(s))]
                if self._partial is not None:
                    slots += [self._partial.slot] * self._rows_of(self._partial)
                self.rows.prepare(slots + [seq.slot] * rows)
            if not self.kv.grow(row, len(seq.prompt)):  # can_hold said it fits
                raise self.kv.full_error(len(seq.prompt), row)
            what = f"restoring a cached prefix of {hit} tokens"
            if entry is not None:
                self.prefix.restore(entry, hit, row)
        except Exception as exc:
            log.exception("admitting %s failed", seq.handle.request_id)
            self.kv.release(row)
            self._finish(seq, "error", memory_error(exc, what))
            return False
        with self._cond:
            self._queued -= 1
        seq.admitted = True
        seq.row, seq.length = row, hit
        seq.sampler = RowSampler.build(seq.params, seq.prompt, self.runner.vocab_size, self.device)
        return True

    def _segments(self, seq: _Sequence, end: int) -> list[PrefillSegment]:
        """Positions seq.length..end of a prompt as chunks whose boundaries depend on the
        prompt alone, so a prompt is computed the same way in any company and with or
        without a cached prefix; the last one wants logits if it ends the prompt."""
        return [
            PrefillSegment(seq.row, seq.prompt[c : min(c + PREFILL_CHUNK, end)], c, seq.slot,
                           logits=min(c + PREFILL_CHUNK, end) == len(seq.prompt))
            for c in range(seq.length, end, PREFILL_CHUNK)
        ]

    def _forward(self, work: list[tuple[_Sequence, int]]) -> dict[_Sequence, torch.Tensor | BaseException | None]:
        """Prefill each (sequence, up to position) in one forward; if that fails, each
        alone, so a failure ends only the requests it belongs to. Maps each sequence to
        its last logits (None if its prompt is not all in yet) or its error."""
        segments = [self._segments(seq, end) for seq, end in work]
        try:
            logits = self.runner.prefill([g for group in segments for g in group], self.bank)
        except Exception as exc:
            if len(work) == 1:
                seq = work[0][0]
                log.exception("prefilling %s failed", seq.handle.request_id)
                return {seq: memory_error(exc, f"prefilling a prompt of {len(seq.prompt)} tokens")}
            log.warning("a prefill of %d prompts failed; prefilling them one at a time", len(work))
            return {seq: self._forward([(seq, end)])[seq] for seq, end in work}
        out: dict[_Sequence, torch.Tensor | BaseException | None] = {}
        j = 0
        for (seq, end), group in zip(work, segments):
            out[seq] = None
            if group[-1].logits:
                out[seq], j = logits[j], j + 1
        return out

    def _prefill(self, fresh: list[_Sequence], budget: int) -> None:
        """Prefill the fresh requests whole, a few at a time, then the partial one by as
        many chunks as the budget leaves (at least one). After each forward its prompts
        sample their first token and join the running batch in cache-row order."""
        started = time.perf_counter()
        remove: list[int] = []
        pending = deque(fresh)  # joined in row order: the batch stays in rows 0..N-1

        def join_ready(results: dict) -> None:
            # the next ones whose first logits are known: prefilled, or copying a prefill
            while pending and (pending[0].source is not None or pending[0] in results):
                seq = pending.popleft()
                remove.extend(self._join(seq, self._share(seq) if seq.source is not None else results[seq]))

        for group in _forward_groups([s for s in fresh if s.source is None]):
            join_ready(self._run([(seq, len(seq.prompt)) for seq in group]))
        join_ready({})
        partial = self._partial
        if partial is not None:
            end = min(len(partial.prompt), partial.length + max(budget // PREFILL_CHUNK, 1) * PREFILL_CHUNK)
            result = None
            while partial.length < end and not isinstance(result, BaseException):
                result = self._run([(partial, min(end, partial.length + PREFILL_FORWARD_TOKENS))])[partial]
            if isinstance(result, BaseException):
                self._drop_partial("error", result)
            elif result is not None:
                self._partial = None
                row = len(self._running)
                if partial.row != row:
                    self.kv.move(partial.row, row, partial.length)
                    partial.row = row
                partial.share_key = (_prefix_key(partial), tuple(partial.prompt))
                self.shared.register(partial.share_key, partial)
                _keep_first_logits(partial, result)
                remove += self._join(partial, result)
        self._prefill_seconds += time.perf_counter() - started
        if remove:
            self._remove_rows(sorted(set(remove)))

    def _fused_step(self, fresh: list[_Sequence]) -> bool:
        """Prefill the fresh requests and decode the running ones in one forward
        (LlamaRunner.step), where it gives every row what the separate forwards would: with
        the CPU kernels, no partial prompt, one choice each, and prompts that fit one
        forward. False if it did not run (or failed, having finished nothing): then the
        caller prefills and decodes apart."""
        running = self._running
        own = [s for s in fresh if s.source is None]  # the others copy a prefill (_share)
        if (not own or not running or self._partial is not None or self.runner.token_lora is None
                or self.runner.attention_kernel is None or any(s.others for s in fresh)
                or len(_forward_groups(own)) > 1
                or any(s.source is not None and s.source not in own and s.source.first_logits is None for s in fresh)):
            return False
        if not all(self.kv.grow(i, seq.length + 1) for i, seq in enumerate(running)):
            return False  # the budget is short: the separate path ends the row that does not fit
        started = time.perf_counter()
        segments = [g for seq in own for g in self._segments(seq, len(seq.prompt))]
        try:
            decoded, prompted = self.runner.step([s.last for s in running], [s.length for s in running],
                                                 [s.slot for s in running], segments, self.bank)
        except Exception:  # the separate forwards find whose request it was
            log.warning("a decode step with %d prompts failed; running them apart", len(fresh), exc_info=True)
            return False
        for seq in running:
            seq.length += 1
        for seq, logits in zip(own, prompted):
            self._prefill_tokens += len(seq.prompt) - seq.length
            seq.length = len(seq.prompt)
            _keep_first_logits(seq, logits)
            self.prefix.offer(_prefix_key(seq), seq.prompt, seq.row)
        running.extend(fresh)  # their cache rows follow the running ones' (_admit)
        computed = dict(zip(own, prompted))
        firsts = [computed[seq] if seq.source is None else self._share(seq) for seq in fresh]
        tokens, logprobs = pick_tokens(torch.cat([decoded, torch.stack(firsts)]), [s.sampler for s in running])
        self._decode_seconds += time.perf_counter() - started
        self._steps += 1
        self._fused_steps += 1
        done = [i for i, seq in enumerate(running) if self._accept(seq, tokens[i], logprobs[i])]
        if done:
            self._remove_rows(done)
        return True

    def _run(self, work: list[tuple[_Sequence, int]]) -> dict[_Sequence, torch.Tensor | BaseException | None]:
        """One prefill forward (see _forward), its sequences moved on and their
        prompts offered to the prefix cache."""
        results = self._forward(work)
        for seq, end in work:
            if isinstance(results[seq], BaseException):
                self.shared.drop(seq.share_key, seq)
            else:
                self._prefill_tokens += end - seq.length
                seq.length = end
                if results[seq] is not None:
                    _keep_first_logits(seq, results[seq])
                    self.prefix.offer(_prefix_key(seq), seq.prompt, seq.row)
        return results

    def _share(self, seq: _Sequence) -> torch.Tensor | BaseException:
        """Give `seq` (in its cache row, grown for its prompt) the prompt positions and
        last logits of the request it copies (shared_prompts.py), which is in the running
        batch by now; if that one's prefill failed, prefill `seq` itself."""
        owner, seq.source = seq.source, None
        row = next((i for i, s in enumerate(self._running) if s is owner), None)
        if owner.first_logits is None or row is None:
            return self._run([(seq, len(seq.prompt))])[seq]
        self.kv.copy(row, seq.row, len(seq.prompt))
        seq.length = len(seq.prompt)
        self.shared.shared += 1
        return owner.first_logits

    def _join(self, seq: _Sequence, result: torch.Tensor | BaseException) -> list[int]:
        """Put a prefilled request (and its other choices) into the running batch and
        sample their first tokens; the rows to remove again (finished or failed)."""
        row, rows = len(self._running), self._rows_of(seq)
        if isinstance(result, BaseException):
            self._finish(seq, "error", result)
            self._running.extend([seq] * rows)  # placeholders, removed with the finished rows
            return list(range(row, row + rows))
        self._running.append(seq)
        try:
            group = [seq, *self._copies(seq, row)]
        except Exception as exc:
            log.exception("copying the choices of %s failed", seq.handle.request_id)
            error = memory_error(exc, f"copying the prefilled prompt into {rows} choices")
            made = self._running[row:]
            for s in [seq, *(g for g in made if g is not seq)]:
                self._finish(s, "error", error)
            self._running.extend([seq] * (row + rows - len(self._running)))
            return list(range(row, row + rows))
        tokens, logprobs = pick_tokens(result[None].expand(len(group), -1), [s.sampler for s in group])
        return [row + j for j, s in enumerate(group) if self._accept(s, tokens[j], logprobs[j])]

    def _copies(self, seq: _Sequence, row: int) -> list[_Sequence]:
        """Choices 1..n-1 of a prefilled sequence: its cache row copied, its adapter
        pinned once more, each with its own sampler (seed + i)."""
        copies = []
        for i, handle in enumerate(seq.others, start=1):
            copy = _Sequence(handle=handle, prompt=seq.prompt, adapter=seq.adapter, params=seq.params,
                             stop_ids=seq.stop_ids, length=seq.length, admitted=True)
            copy.sampler = RowSampler.build(seq.params, seq.prompt, self.runner.vocab_size, self.device, i)
            self.kv.grow(len(self._running), seq.length)  # fits: admission counted every row
            self.kv.copy(row, len(self._running), seq.length)
            if seq.slot:  # pinned once the row is there, so a failed copy leaves no pin behind
                copy.slot = self.cache.acquire(seq.adapter)  # loaded and pinned: the same slot
            self._running.append(copy)
            copies.append(copy)
        seq.others = []
        return copies

    def _decode_step(self) -> None:
        running = self._running
        started = time.perf_counter()
        logits = self.runner.decode(
            [s.last for s in running], [s.length for s in running], self.rows, [s.slot for s in running]
        )
        for seq in running:
            seq.length += 1
        tokens, logprobs = pick_tokens(logits, [s.sampler for s in running])
        self._decode_seconds += time.perf_counter() - started
        self._steps += 1
        done = [i for i, seq in enumerate(running) if self._accept(seq, tokens[i], logprobs[i])]
        if done:
            self._remove_rows(done)

    def _accept(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Record a sampled token; True if the sequence is finished."""
        self._tokens_generated += 1
        seq.sampler.accept(token)
        if token in seq.stop_ids:  # a stop token ends the answer and is not part of it
            self._finish(seq, "stop")
            return True
        seq.generated += 1
        seq.last = token
        event = TokenEvent(token)
        if logprobs is not None:
            event.logprob, event.top_logprobs = logprobs
        if seq.sampler.done():  # the constraint is complete: this token ends the answer
            event.finish_reason = "stop"
        # prompt + answer never exceed the context: the cache holds `length` tokens and
        # this one would take the next position
        elif seq.generated >= seq.params.max_tokens or seq.length + 1 >= self.context_length:
            event.finish_reason = "length"
        if event.finish_reason is not None:
            self._finish(seq, event.finish_reason, event=event)
            return True
        seq.handle.emit(event)
        return False

    def _grow_for_decode(self) -> None:
        """Make room in the KV cache for each running row's next position. The first row
        the budget has no room for ends with a KVBudgetError and gives its cache back,
        which may be room enough for the rows after it; the others decode on."""
        while True:
            full = next((i for i, seq in enumerate(self._running) if not self.kv.grow(i, seq.length + 1)), None)
            if full is None:
                return
            seq = self._running[full]
            log.warning("KV cache full: request %s ends with an error at %d positions",
                        seq.handle.request_id, seq.length)
            self._finish(seq, "error", self.kv.full_error(seq.length + 1, len(self._running)))
            self._remove_rows([full])

    def _remove_rows(self, rows: list[int]) -> None:
        """Drop finished rows and give back their KV cache, moving the last rows into the
        holes so the batch stays in cache rows 0..N-1."""
        for i in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                self.kv.move(last, i, moved.length)
                self._running[i] = moved
            else:
                self.kv.release(i)
            self._running.pop()

    def _drop_partial(self, reason: str, error: BaseException | None = None) -> None:
        """End the partial prefill (cancelled, failed) and give back its cache row."""
        partial, self._partial = self._partial, None
        self.kv.release(partial.row)
        self._finish(partial, reason, error)

    def _unwant(self, seq: _Sequence) -> None:
        if seq.wanting:
            seq.wanting = False
            self.cache.unwant(seq.adapter.key)

    def _finish(
        self, seq: _Sequence, reason: str, error: BaseException | None = None, event: TokenEvent | None = None
    ) -> None:
        """Send the final event and give back what the sequence held (queue place,
        adapter want, slot pin). The caller removes its batch row if it had one.
        Choices not yet prefilled end with it."""
        if not seq.admitted:
            seq.admitted = True
            with self._cond:
                self._queued -= 1
        self._unwant(seq)
        self.shared.drop(seq.share_key, seq)
        if seq.slot:
            self.cache.release(seq.slot)
            seq.slot = 0
        for handle in seq.others:
            handle.emit(TokenEvent(None, reason, error))
        seq.others = []
        seq.handle.emit(event or TokenEvent(None, reason, error))


def _forward_groups(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """Consecutive sequences, about PREFILL_FORWARD_TOKENS prompt tokens to a forward."""
    groups: list[list[_Sequence]] = []
    tokens = 0
    for seq in seqs:
        n = len(seq.prompt) - seq.length
        if not groups or tokens + n > PREFILL_FORWARD_TOKENS:
            groups.append([])
            tokens = 0
        groups[-1].append(seq)
        tokens += n
    return groups


def _keep_first_logits(seq: _Sequence, logits: torch.Tensor) -> None:
    """An owner of its prompt (shared_prompts.py) keeps its last logits for requests that
    copy its prefill; a copy of the row, not a view that would keep the forward's whole
    logits tensor alive while it answers."""
    if seq.share_key is not None:
        seq.first_logits = logits.clone()


def _prefix_key(seq: _Sequence) -> str:
    """Whose cached prefixes a request may use: its adapter's content, or the base's."""
    return seq.adapter.key if seq.adapter is not None else ""


def _all_cancelled(seq: _Sequence) -> bool:
    return seq.handle.cancelled and all(h.cancelled for h in seq.others)
