"""Where hatrack keeps its state. No heavy imports here: everything imports this."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE_NAME = "smollm2-135m"


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
