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
