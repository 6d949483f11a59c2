"""Requests that ask the same thing share one prefill.

When a request's prompt (every token) and adapter equal those of a request that is
prefilling in the same iteration or already answering, the engine copies that request's
prompt positions of the KV cache into the new row and samples the new request's first
token from the same last-position logits, instead of computing the prompt again. A
burst of identical prompts (retries, a health check, one question to many replicas of
a client, the `n` of separate requests) then costs one prompt's compute.

The answer does not change: a prompt's KV and logits do not depend on the rows that
share its forward (the engine's batch invariance), so the owner's are exactly the ones
the new request would have computed. Keys are the adapter's content key and the whole
prompt, so a prompt is never shared across adapters or with the base. Each request
still samples with its own parameters (temperature, seed, stop tokens, constraints).
"""

from __future__ import annotations

from typing import Any

Key = tuple[str, tuple[int, ...]]


class SharedPrompts:
    """Which request owns each (adapter key, prompt) whose KV a new request may copy.
    Scheduler thread only. An owner is registered when it is admitted (its logits come
    with its prefill) and dropped when it finishes or its prefill fails; the engine finds
    the owner's current cache row itself (rows move as others finish)."""

    def __init__(self) -> None:
        self._owners: dict[Key, Any] = {}
        self.shared = 0  # prompts answered from another request's prefill

    def owner(self, key: Key) -> Any | None:
        return self._owners.get(key)

    def register(self, key: Key, seq: Any) -> None:
        self._owners.setdefault(key, seq)

    def drop(self, key: Key | None, seq: Any) -> None:
        """Forget `seq` as the owner of `key` (no-op if another request owns it)."""
        if key is not None and self._owners.get(key) is seq:
            del self._owners[key]

    def clear(self) -> None:
        self._owners.clear()

    def __len__(self) -> int:
        return len(self._owners)
