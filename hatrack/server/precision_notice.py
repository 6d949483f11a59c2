"""Says, once per adapter version, when the server runs it at a precision none of its
scores were measured at: its scores then describe another model than the one answering."""

from __future__ import annotations

import logging
import threading

from hatrack.registry import Registry, ResolvedModel

log = logging.getLogger("hatrack.server")


class PrecisionNotice:
    def __init__(self, registry: Registry, served: str) -> None:
        self.registry = registry
        self.served = served  # precision label of the running base: fp32, bf16, nf4, int8
        self._lock = threading.Lock()  # request threads of the threadpool
        self._seen: set[str] = set()

    def seen(self, label: str) -> bool:
        """Whether `label` was checked already (cheap: the event loop may ask)."""
        with self._lock:
            return label in self._seen

    def check(self, resolved: ResolvedModel) -> None:
        """Called on every adapter request; reads the registry only the first time."""
        if resolved.kind != "adapter":
            return
        with self._lock:
            if resolved.label in self._seen:
                return
            self._seen.add(resolved.label)
        try:
            rows = self.registry.version_info(resolved.name, resolved.version)["score_rows"]
        except Exception:  # pruned meanwhile: the request itself will say so
            return
        message = mismatch(resolved.label, self.served, [r.get("precision") for r in rows])
        if message:
            log.warning(message)


def mismatch(label: str, served: str, precisions: list[str | None]) -> str | None:
    """The warning for an adapter whose scores carry these precisions, or None."""
    if not precisions:
        return None  # no scores: nothing claims to describe it
    measured = sorted({p for p in precisions if p})
    if not measured:
        return (f"serving {label} at {served}; its scores do not record the precision they were "
                f"measured at")
    if served not in measured:
        return f"serving {label} at {served}; its scores were measured at {', '.join(measured)}"
    return None
