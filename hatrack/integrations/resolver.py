"""The registry as vLLM's LoRA resolver, without vLLM: a request's model name
(`name`, `name@N`, `name@alias`) becomes a verified adapter folder in the store, or None.

vLLM hands its resolvers the value it was started with as --model (usually the base's
folder) and the requested name. `ServedBase` maps that value to a registry base; a
version recorded on another base, or on other weights under the same name (another
fingerprint), is refused. Unknown names, pruned versions and artifacts that are
missing or fail their sha256 resolve to None, so vLLM answers 404 and never loads them.

The base's own registry name resolves to an adapter that adds nothing (see
zero_adapter.py for the vLLM fault that makes this necessary). vLLM remembers each name
it resolved until it is unloaded: `notify.py` unloads names whose alias moved."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hatrack.adapter_format import ARTIFACT_FILES
from hatrack.integrations.zero_adapter import zero_adapter

if TYPE_CHECKING:
    from hatrack.registry import BaseRecord, Registry

log = logging.getLogger("hatrack.vllm")
BASE_ENV = "HATRACK_VLLM_BASE"  # the registry base vLLM serves, when --model does not say
MAX_INT_ID = 2**31 - 2
ZERO_INT_ID = 2**31 - 1  # the base's zero adapter: above every version's id
ZERO_ROOT_ENV = "HATRACK_VLLM_ZERO_DIR"  # where zero adapters are written (default: the temp folder)


@dataclass(frozen=True)
class ResolvedLora:
    lora_name: str  # as requested: vLLM keys its adapters by it
    label: str  # the concrete version, name@N
    path: Path  # the verified store folder
    int_id: int  # the version's registry row id: stable, positive, < 2**31
    sha256: str
    base_name: str


class Refused(Exception):
    """A name the registry knows but that must not be served here; the reason is logged."""


class RegistryResolver:
    """Thread-safe; one per vLLM process. Verification of an artifact is cached by its
    path, sha256 and the files' (size, mtime, inode), so a folder is hashed once while it
    stays as it was, and again after anything rewrites it."""

    def __init__(self, registry: "Registry | None" = None, base_name: str | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._registry = registry
        self.log = logger or log  # vLLM passes its own, so refusals show in its log
        self._base_name = base_name if base_name is not None else os.environ.get(BASE_ENV) or None
        self._zero_root = Path(os.environ.get(ZERO_ROOT_ENV) or Path(tempfile.gettempdir()) / "hatrack-vllm-zero")
        self._verified: set[tuple] = set()
        self._lock = threading.Lock()

    @property
    def registry(self) -> "Registry":
        if self._registry is None:
            from hatrack.registry import Registry

            self._registry = Registry()
        return self._registry

    # ------------------------------------------------------------ the served base

    def served_base(self, base_model_name: str) -> "BaseRecord | None":
        """The registry base behind vLLM's --model: HATRACK_VLLM_BASE when set, else the
        base whose name, folder or Hugging Face source equals it."""
        from hatrack.registry import NotFoundError

        if self._base_name:
            try:
                return self.registry.get_base(self._base_name)
            except NotFoundError:
                self.log.error("hatrack: %s=%s is not a registered base", BASE_ENV, self._base_name)
                return None
        wanted = str(base_model_name)
        wanted_path = _real(wanted)
        for base in self.registry.list_bases():
            if wanted in (base.name, base.source) or (wanted_path and wanted_path == _real(str(base.path))):
                return base
        return None

    # ------------------------------------------------------------ resolve

    def resolve(self, base_model_name: str, lora_name: str) -> ResolvedLora | None:
        """The verified adapter for lora_name on the base vLLM serves, or None."""
        try:
            return self._resolve(base_model_name, lora_name)
        except Refused as why:
            self.log.warning("hatrack: refused %r: %s", lora_name, why)
            return None

    def _resolve(self, base_model_name: str, lora_name: str) -> ResolvedLora | None:
        from hatrack.registry import ArtifactError, InvalidNameError, NotFoundError

        base = self.served_base(base_model_name)
        if base is None:
            raise Refused(f"vLLM serves {base_model_name!r}, which is no registered base "
                          f"(set {BASE_ENV} to the registry base it is)")
        if lora_name == base.name:
            return self._zero(base)
        try:
            resolved = self.registry.resolve(lora_name)
        except (InvalidNameError, NotFoundError):
            return None  # not hatrack's name: another resolver may know it
        if resolved.kind != "adapter":
            return None
        if resolved.base_name != base.name or resolved.base_fingerprint != base.fingerprint:
            raise Refused(f"{resolved.label} was trained on base {resolved.base_name!r} "
                          f"({resolved.base_fingerprint[:12]}), not on the served {base.name!r} "
                          f"({base.fingerprint[:12]})")
        record = self.registry.get_version(resolved.name, resolved.version)
        try:
            path = self._verified_path(record.sha256)
        except ArtifactError as exc:
            raise Refused(f"{resolved.label}: {exc}") from None
        if not 0 < record.id <= MAX_INT_ID:
            raise Refused(f"{resolved.label}: row id {record.id} does not fit vLLM's adapter ids")
        return ResolvedLora(lora_name, resolved.label, path, record.id, record.sha256, base.name)

    def _zero(self, base: "BaseRecord") -> ResolvedLora:
        """The base's own name, answered by an adapter that adds nothing (zero_adapter.py)."""
        from hatrack.registry.store import hash_folder

        try:
            path = zero_adapter(base.name, base.fingerprint, base.path, self._zero_root)
        except (OSError, ValueError) as exc:
            raise Refused(f"cannot write the zero adapter for {base.name}: {exc}") from None
        return ResolvedLora(base.name, base.name, path, ZERO_INT_ID, hash_folder(path), base.name)

    def _verified_path(self, sha256: str) -> Path:
        path = self.registry.store.path(sha256)
        key = (str(path), sha256, _stat_key(path))
        with self._lock:
            if key in self._verified:
                return path
        checked = self.registry.open_artifact(sha256, verify=True)  # raises ArtifactError
        with self._lock:
            self._verified.add(key)
        return checked


def _stat_key(folder: Path) -> tuple:
    try:
        stats = [(folder / name).stat() for name in ARTIFACT_FILES]
    except OSError:
        return ()
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def _real(value: str) -> str | None:
    """A path's real form when value names an existing folder, else None."""
    try:
        path = Path(value).expanduser()
        return str(path.resolve()) if path.is_dir() else None
    except (OSError, ValueError):
        return None
