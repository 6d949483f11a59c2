"""sha256 over whole files, read in blocks so a multi-gigabyte base never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path | str, into: "hashlib._Hash | None" = None) -> str:
    """The hex sha256 of a file's bytes. With `into` (a running hashlib.sha256), the
    bytes are fed into that hash instead, for digests that combine several files
    (names and bytes), and its hexdigest so far is returned."""
    digest = into if into is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
