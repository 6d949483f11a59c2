"""Sizes and ages as people read them, for the CLI's tables and the dashboard's pages."""

from __future__ import annotations

import time


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def human_age(ts: int | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    secs = max(0, int(now or time.time()) - int(ts))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= span:
            return f"{secs // span}{unit}"
    return f"{secs}s"
