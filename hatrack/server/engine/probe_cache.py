"""Row-padding probe results kept on disk (dense_rows.py), so that a restart on the same
machine skips the probe: 0.9 s of the default base's ~7 s cold start on an AVX-512 BF16
host, more for a larger base.

A result holds for one CPU (model name, flags, cache sizes), one torch build and one probe
(its rows and quanta): the file is named by a digest of those and lives in the kernel cache
folder (cpu_kernel.cache_dir). Only CPU results are kept. A file that cannot be read or
parsed is ignored and rewritten; one that cannot be written leaves the probe to run again
next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("hatrack.engine")

_lock = threading.Lock()
_files: dict[str, dict[str, int]] = {}  # path -> its results, as read or written


def path_for(probe_settings: str) -> Path:
    import torch

    from hatrack.server.engine import cpu_kernel

    digest = hashlib.sha256()
    cpu = cpu_kernel.cpu_description(("model name", "cpu family", "model\t", "flags", "cache size"))
    for part in (cpu, torch.__version__, probe_settings):
        digest.update(part.encode())
        digest.update(b"\0")
    return cpu_kernel.cache_dir() / f"row-probes-{digest.hexdigest()[:16]}.json"


def _results(path: Path) -> dict[str, int]:
    key = str(path)
    if key not in _files:
        try:
            data = json.loads(path.read_text())
            _files[key] = {k: int(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError):
            _files[key] = {}
    return _files[key]


def lookup(path: Path, key: str) -> int | None:
    with _lock:
        return _results(path).get(key)


def remember(path: Path, key: str, quantum: int) -> None:
    with _lock:
        results = _results(path)
        results[key] = quantum
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(results, sort_keys=True, indent=1))
            os.replace(tmp, path)  # whole or not at all, whoever else writes it
        except OSError as err:
            log.info("row-padding probe results not kept (%s): the probe runs again next start", err)
