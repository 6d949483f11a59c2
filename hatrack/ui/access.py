"""Who is looking at the dashboard, and what they may see and change.

Open (`--no-auth`) or keyed is chosen at start, as for the API. With keys, a browser
signs in once with its API key: the key goes into an HttpOnly, SameSite=Strict cookie
(scripts may send `Authorization: Bearer KEY` instead). A tenant's key sees only the
adapters its patterns allow and changes nothing; an admin key (one allowed `*`, every
name) may promote, tag and prune. Every form carries a CSRF token bound to the key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Callable

from fastapi import Request

from hatrack.registry import key_allows

COOKIE = "hatrack_key"
ADMIN_PATTERN = "*"


@dataclass
class Viewer:
    key: object | None  # the KeyRecord; None on an open dashboard
    token: str  # CSRF token of this viewer's forms

    @property
    def admin(self) -> bool:
        return self.key is None or ADMIN_PATTERN in getattr(self.key, "patterns", [])

    @property
    def who(self) -> str:
        return "open (no keys)" if self.key is None else f"tenant {self.key.tenant}" + (" (admin)" if self.admin else "")

    def sees(self, name: str) -> bool:
        return self.key is None or key_allows(self.key, name)


class Access:
    """Resolves the viewer of a request through `lookup(secret) -> KeyRecord | None`
    (the server's key gate, with its one-second cache, or the registry directly)."""

    def __init__(self, lookup: Callable[[str], object | None], *, open_access: bool) -> None:
        self.lookup = lookup
        self.open = open_access
        self._secret = secrets.token_bytes(32)  # CSRF tokens die with the process

    @staticmethod
    def presented(request: Request) -> str | None:
        header = request.headers.get("authorization") or ""
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.cookies.get(COOKIE)

    def viewer(self, request: Request) -> Viewer | None:
        """The viewer, or None when keys are on and no valid key came with the request."""
        if self.open:
            return Viewer(None, self._token("open"))
        secret = self.presented(request)
        key = self.lookup(secret) if secret else None
        if key is None:
            return None
        return Viewer(key, self._token(hashlib.sha256(secret.encode()).hexdigest()))

    def _token(self, who: str) -> str:
        return hmac.new(self._secret, who.encode(), hashlib.sha256).hexdigest()[:32]

    def check_token(self, viewer: Viewer, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(viewer.token, token)
