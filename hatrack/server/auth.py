"""Bearer-key checks. Open or keyed is chosen when the server starts (`--no-auth`),
never inferred from how many keys exist: revoking every key refuses every request."""

from __future__ import annotations

import hashlib
import threading
import time

from hatrack.registry import Registry, key_allows

# keys created or revoked while serving take effect within this many seconds
KEY_TTL_SECONDS = 1.0
_MAX_CACHED = 4096  # distinct valid secrets remembered; beyond that the cache starts over


class Unauthorized(Exception):
    """Missing, wrong or revoked key (401)."""


class KeyGate:
    """Answers 'who is calling, and may they use this model?'.

    A valid key's record is remembered for at most `ttl` seconds, so a revoked key is
    refused within `ttl`; an unknown secret is looked up on every request (nothing
    cached), so a new key works on its first request."""

    def __init__(self, registry: Registry, *, open_access: bool = False, ttl: float = KEY_TTL_SECONDS) -> None:
        self.registry = registry
        self.open = open_access
        self.ttl = ttl
        self._lock = threading.Lock()  # callers run on the threadpool and the event loop
        self._valid: dict[str, tuple[float, object]] = {}  # sha256(secret) -> (checked at, key)

    def caller(self, authorization: str | None):
        """The key record of the caller; None on an open server. Raises Unauthorized."""
        if self.open:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        secret = authorization[7:].strip()
        key = self._lookup(secret)
        if key is None:
            raise Unauthorized("invalid API key")
        return key

    def _lookup(self, secret: str):
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._valid.get(digest)
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1]
        key = self.registry.authenticate(secret)
        with self._lock:
            if key is None:
                self._valid.pop(digest, None)
            else:
                if len(self._valid) >= _MAX_CACHED:
                    self._valid.clear()
                self._valid[digest] = (now, key)
        return key

    @staticmethod
    def allows(key, model_name: str) -> bool:
        return key is None or key_allows(key, model_name)
