"""Bearer-key checks. Keys live hashed in the registry; when none exists the API is open."""

from __future__ import annotations

import time

from hatrack.registry import Registry, key_allows


class Unauthorized(Exception):
    """Missing or wrong key (401)."""


class KeyGate:
    """Answers 'who is calling, and may they use this model?'. Whether any key exists
    is re-read at most every `ttl` seconds, so keys created while serving take effect."""

    def __init__(self, registry: Registry, ttl: float = 1.0) -> None:
        self.registry = registry
        self.ttl = ttl
        self._has_keys = False
        self._checked_at = 0.0

    def keys_required(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at > self.ttl:
            self._has_keys = self.registry.has_keys()
            self._checked_at = now
        return self._has_keys

    def caller(self, authorization: str | None):
        """The key record of the caller; None when the API is open. Raises Unauthorized."""
        if not self.keys_required():
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        key = self.registry.authenticate(authorization[7:].strip())
        if key is None:
            raise Unauthorized("invalid API key")
        return key

    @staticmethod
    def allows(key, model_name: str) -> bool:
        return key is None or key_allows(key, model_name)
