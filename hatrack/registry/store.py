"""The content-addressed artifact store: `store/<sha256>/adapter_config.json` +
`adapter_model.safetensors`. The sha256 covers both files in sorted name order, each
as `name + b"\\0" + bytes`. Files are copied into a temporary folder inside the store
while being hashed, then renamed into place, so a reader never sees half a folder and
the same content stored twice keeps one copy."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from hatrack import adapter_format
from hatrack.adapter_format import ARTIFACT_FILES, CONFIG, WEIGHTS  # noqa: F401  (re-exported)
from hatrack.errors import disk_condition
from hatrack.hashing import sha256_file
from hatrack.registry.errors import ArtifactError

TMP_PREFIX = ".tmp-"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20


def artifact_files(folder: Path) -> tuple[Path, Path]:
    """The two files of an adapter folder, or an ArtifactError naming what is missing
    (a folder of pickle weights only is refused: they are never loaded)."""
    try:
        return adapter_format.artifact_files(folder)
    except adapter_format.AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None


def hash_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in artifact_files(folder):
        digest.update(path.name.encode() + b"\0")
        sha256_file(path, into=digest)
    return digest.hexdigest()


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA_RE.match(sha256 or ""):
            raise ArtifactError(f"invalid artifact sha256 {sha256!r}")
        return self.root / sha256

    def put(self, folder: Path) -> tuple[str, int]:
        """Copy an adapter folder's two files into the store; return (sha256, size). A
        write the disk refuses (full, read-only) is one clear ArtifactError, and leaves
        neither a temporary folder nor anything under the final name."""
        sources = artifact_files(folder)
        try:
            return self._put(sources)
        except OSError as exc:
            raise ArtifactError(f"artifact store {self.root}: {_disk_problem(exc)}") from None

    def _put(self, sources: tuple[Path, Path]) -> tuple[str, int]:
        self._sweep_stale_tmp()
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            digest = hashlib.sha256()
            for src in sources:
                digest.update(src.name.encode() + b"\0")
                with open(src, "rb") as fin, open(tmp / src.name, "wb") as fout:
                    for block in iter(lambda: fin.read(_BLOCK), b""):
                        digest.update(block)
                        fout.write(block)
                    fout.flush()
                    os.fsync(fout.fileno())
            sha256 = digest.hexdigest()
            size = folder_size(tmp)
            target = self.root / sha256
            if target.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)  # same content already stored
                return sha256, size
            os.chmod(tmp, 0o755)
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # not a lost race with an identical copy
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return sha256, size
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _sweep_stale_tmp(self) -> None:
        """Temp folders of registrations killed mid-copy: nothing else ever removes them
        unless `hatrack check --fix` is run."""
        for name in os.listdir(self.root):
            if self.is_stale_tmp(name):
                shutil.rmtree(self.root / name, ignore_errors=True)

    def open(self, sha256: str, verify: bool = True) -> Path:
        """The store folder of `sha256`, checked to hold exactly that content."""
        target = self.path(sha256)
        # the store writes real folders and files only: a symlink there was planted, and
        # could point a load anywhere on disk whatever the hash says
        if target.is_symlink() or any((target / name).is_symlink() for name in ARTIFACT_FILES):
            raise ArtifactError(f"artifact {sha256[:12]} is a symbolic link in the store; refused (run `hatrack check`)")
        if not target.is_dir():
            raise ArtifactError(f"artifact {sha256[:12]} is missing from the store (run `hatrack check`)")
        if verify:
            try:
                actual = hash_folder(target)
            except ArtifactError:
                raise ArtifactError(f"artifact {sha256[:12]} is incomplete in the store (run `hatrack check`)") from None
            if actual != sha256:
                raise ArtifactError(
                    f"artifact {sha256[:12]} is corrupt: its files hash to {actual[:12]} (run `hatrack check`)"
                )
        return target

    def exists(self, sha256: str) -> bool:
        return (self.root / sha256).is_dir()

    def entries(self) -> list[str]:
        """Names of every folder in the store (content folders and leftover temp folders)."""
        return sorted(p.name for p in self.root.iterdir())

    def is_stale_tmp(self, name: str, min_age_s: float = 600.0) -> bool:
        """A temp folder old enough that no registration is still writing it."""
        path = self.root / name
        try:
            return name.startswith(TMP_PREFIX) and time.time() - path.stat().st_mtime > min_age_s
        except FileNotFoundError:
            return False

    def size(self, sha256: str) -> int:
        path = self.root / sha256
        return folder_size(path) if path.is_dir() else 0

    def remove(self, name: str) -> None:
        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _disk_problem(exc: OSError) -> str:
    """An OSError as what a user can act on: which condition, then the system's words."""
    condition = disk_condition(exc)
    detail = exc.strerror or type(exc).__name__
    return f"{condition} ({detail})" if condition else detail
