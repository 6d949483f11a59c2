"""Failures the engine reports to its callers; each str() is one line."""

from __future__ import annotations

from hatrack.errors import HatrackError


class EngineError(HatrackError):
    """Base class of the engine's user-facing failures."""


class QueueFullError(EngineError):
    """The waiting queue holds max_waiting requests already (HTTP 429)."""


class PromptTooLongError(EngineError):
    """The prompt leaves no room for a single new token in the context (HTTP 400)."""


class InvalidRequestError(EngineError):
    """A request's prompt or sampling parameters are out of range (HTTP 400)."""


class EngineStoppedError(EngineError):
    """The engine is stopping or stopped and admits nothing new (HTTP 503)."""


class AdapterFormatError(EngineError):
    """An adapter folder or its weights cannot be used: the message names the file,
    tensor or field at fault."""


class KVBudgetError(EngineError):
    """A request needs more KV cache than the engine's budget holds: at submit when it
    could never fit (HTTP 400), or mid-answer when the cache is full (finish "error")."""


class EngineMemoryError(EngineError):
    """Memory ran out for one request (growing the adapter slot bank or the per-row
    adapter copies, or running its prefill): that request ends with this error, what it
    took is given back and the engine serves on (HTTP 503: retry later)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: MemoryError, torch.OutOfMemoryError (CUDA),
    or the RuntimeError torch's CPU allocator raises. By name, so this module needs no torch."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def memory_error(exc: BaseException, what: str) -> BaseException:
    """An EngineMemoryError saying `what` ran out of memory, if `exc` is an allocation
    failure (its cause kept); `exc` itself otherwise."""
    if isinstance(exc, EngineError) or not is_out_of_memory(exc):
        return exc
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = detail.split("err == 0. ", 1)[-1]  # torch's CPU allocator prefixes its source line
    error = EngineMemoryError(f"out of memory {what} ({detail[:200]}); retry later")
    error.__cause__ = exc
    return error
