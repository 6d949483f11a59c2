"""Tell vLLM replicas to forget names whose meaning changed. vLLM keeps each resolved
name (`acme@prod`) bound to the folder it first resolved to; after `hatrack alias acme
prod 3` it must unload the name so the next request resolves it again, to version 3.

`hatrack alias` calls `moved_names` + `unload` for every replica in HATRACK_VLLM_REPLICAS
(comma-separated base URLs); `hatrack vllm unload` does it by hand. Standard library
only: this runs inside vLLM's environment too."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from hatrack.registry.names import PROD

REPLICAS_ENV = "HATRACK_VLLM_REPLICAS"


@dataclass(frozen=True)
class UnloadResult:
    replica: str
    name: str
    status: str  # "unloaded", "not loaded" (nothing to forget) or "failed"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"replica": self.replica, "name": self.name, "status": self.status, "detail": self.detail}


def replicas_from_env() -> list[str]:
    return [r.strip().rstrip("/") for r in os.environ.get(REPLICAS_ENV, "").split(",") if r.strip()]


def moved_names(name: str, alias: str) -> list[str]:
    """The request names whose version an alias move changes: `name@alias`, and the bare
    `name` when the alias is prod (a bare name means prod's version)."""
    return [f"{name}@{alias}", name] if alias == PROD else [f"{name}@{alias}"]


def unload(replicas: list[str], names: list[str], api_key: str | None = None,
           timeout: float = 10.0) -> list[UnloadResult]:
    """POST /v1/unload_lora_adapter for each name on each replica."""
    results = []
    for replica in replicas:
        for name in names:
            results.append(_unload_one(replica.rstrip("/"), name, api_key, timeout))
    return results


def _unload_one(replica: str, name: str, api_key: str | None, timeout: float) -> UnloadResult:
    body = json.dumps({"lora_name": name}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{replica}/v1/unload_lora_adapter", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return UnloadResult(replica, name, "unloaded", response.read(300).decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode(errors="replace")
        if exc.code == 404:  # vLLM had not resolved that name: nothing stale to forget
            return UnloadResult(replica, name, "not loaded", text)
        return UnloadResult(replica, name, "failed", f"HTTP {exc.code}: {text}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return UnloadResult(replica, name, "failed", str(reason))
