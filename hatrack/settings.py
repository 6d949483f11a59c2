"""Where hatrack keeps its state. No heavy imports here: everything imports this."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE_NAME = "smollm2-135m"
# The largest LoRA rank the engine's slots hold. `register` and `train` refuse a larger
# rank at the door (naming this limit) instead of the server refusing it later.
DEFAULT_MAX_RANK = 64


def home() -> Path:
    """HATRACK_HOME, or ~/.hatrack. Created on first use."""
    path = Path(os.environ.get("HATRACK_HOME") or Path.home() / ".hatrack").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_url() -> str:
    """HATRACK_DB_URL, or a SQLite file inside HATRACK_HOME."""
    return os.environ.get("HATRACK_DB_URL") or f"sqlite:///{home() / 'registry.db'}"


def store_dir() -> Path:
    path = home() / "store"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bases_dir() -> Path:
    """Converted base models. HATRACK_BASES_DIR moves them out of HATRACK_HOME (a Docker
    image bakes the default base there, outside the data volume)."""
    path = Path(os.environ["HATRACK_BASES_DIR"]) if os.environ.get("HATRACK_BASES_DIR") else home() / "bases"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kv_cache_gb() -> float | None:
    """HATRACK_KV_CACHE_GB: the serving engine's KV cache budget in GB; None: the engine's
    default (half the memory available when it starts)."""
    raw = os.environ.get("HATRACK_KV_CACHE_GB")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        from hatrack.errors import HatrackError

        raise HatrackError(f"HATRACK_KV_CACHE_GB must be a positive number of GB; got {raw!r}")
    return value


def max_rank() -> int:
    """HATRACK_MAX_RANK, or DEFAULT_MAX_RANK: the servable LoRA rank limit."""
    raw = os.environ.get("HATRACK_MAX_RANK")
    if not raw:
        return DEFAULT_MAX_RANK
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        from hatrack.errors import HatrackError

        raise HatrackError(f"HATRACK_MAX_RANK must be a positive integer; got {raw!r}")
    return value
