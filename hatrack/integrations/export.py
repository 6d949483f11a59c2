"""`hatrack export`: one registered version written in the layout another server reads,
with hatrack's lineage record (`hatrack.json`) beside it.

- peft:  DIR/adapter_config.json + adapter_model.safetensors, the config naming the
         base as the registry stores it (Hugging Face id, else the base's registry name);
- vllm:  DIR/<lora name>/..., vLLM's filesystem resolver layout
         (VLLM_LORA_RESOLVER_CACHE_DIR=DIR): vLLM loads it only when the config's
         base_model_name_or_path equals the value vLLM was started with as --model;
- lorax: DIR/... as PEFT, what LoRAX loads with adapter_source "local" and
         adapter_id DIR; the config names the base LoRAX serves (--model-id).

The artifact is verified against its sha256 before anything is written, and the copy is
hashed again as it is written, so an export is either the registered bytes or nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hatrack import adapter_format
from hatrack.adapter_format import ARTIFACT_FILES, CONFIG
from hatrack.errors import HatrackError

if TYPE_CHECKING:
    from hatrack.registry import Registry, VersionRecord

Layout = Literal["peft", "vllm", "lorax"]
LAYOUTS: tuple[str, ...] = ("peft", "vllm", "lorax")
LINEAGE_FILE = "hatrack.json"
LINEAGE_FORMAT = "hatrack-export/1"
_BLOCK = 1 << 20


class ExportError(HatrackError):
    """An export that cannot be written: the message names the folder or the version."""


@dataclass(frozen=True)
class ExportResult:
    folder: Path  # where the adapter files are (DIR, or DIR/<lora name> for vllm)
    layout: str
    label: str
    sha256: str
    base_model_name_or_path: str
    lineage: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "layout": self.layout, "label": self.label,
                "sha256": self.sha256, "base_model_name_or_path": self.base_model_name_or_path,
                "files": sorted([*ARTIFACT_FILES, LINEAGE_FILE])}


def default_base_model(reg: "Registry", record: "VersionRecord", layout: str) -> str:
    """What the exported config names as its base, unless the caller says otherwise.
    vllm: the base's converted folder, which `hatrack vllm command` passes as --model
    (vLLM's filesystem resolver compares the config with --model, not the served name);
    peft and lorax: the stored reference (Hugging Face id, else the registry name)."""
    if layout == "vllm":
        return str(reg.get_base(record.base_name).path)
    return adapter_format.base_reference(record.base_name, record.base_source)


def lineage_record(reg: "Registry", record: "VersionRecord") -> dict[str, Any]:
    """What the registry knows about a version, as written to hatrack.json."""
    info = reg.version_info(record.name, record.version)
    return {
        "format": LINEAGE_FORMAT,
        "name": record.name, "version": record.version, "label": record.label,
        "sha256": record.sha256, "size": record.size,
        "base": {"name": record.base_name, "fingerprint": record.base_fingerprint, "source": record.base_source},
        "dataset": info.get("dataset"),
        "parent": None if record.parent_version is None else f"{record.name}@{record.parent_version}",
        "scores": info.get("score_rows", []),
        "tags": info.get("tags", {}), "aliases": info.get("aliases", []),
        "lora": record.lora, "seed": record.seed, "lib_versions": record.lib_versions,
        "created": info.get("created"),
    }


def export_version(reg: "Registry", ref: str, dest: Path, layout: str = "peft", *,
                   base_model: str | None = None, lora_name: str | None = None,
                   force: bool = False) -> ExportResult:
    """Write version `ref` under `dest` in `layout`; see the module docstring."""
    from hatrack.registry import ArtifactError
    from hatrack.registry.names import validate_name

    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    record = reg.version_of(ref)
    target = Path(dest).expanduser().absolute()
    if layout == "vllm":
        # vLLM's resolver looks for DIR/<the name a request asks for>
        target = target / validate_name(lora_name or record.name)
    elif lora_name is not None:
        raise ExportError("--lora-name applies to --layout vllm only")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ExportError(f"{target}: folder exists and is not empty (use --force to replace it)")
    try:
        source = reg.open_artifact(record.sha256, verify=True)
    except ArtifactError as exc:
        raise ExportError(f"{record.label}: {exc}; nothing exported") from None
    base_ref = base_model or default_base_model(reg, record, layout)
    lineage = lineage_record(reg, record)
    lineage.update({"layout": layout, "base_model_name_or_path": base_ref,
                    "exported": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")})
    _write(source, target, record.sha256, base_ref, lineage)
    return ExportResult(target, layout, record.label, record.sha256, base_ref, lineage)


def _write(source: Path, target: Path, sha256: str, base_ref: str, lineage: dict[str, Any]) -> None:
    """Copy the artifact into a temporary sibling of target, hashing what is copied, then
    set the config's base and swap the folder into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        digest = hashlib.sha256()
        for name in ARTIFACT_FILES:  # the store's hash: sorted names, name + NUL + bytes
            digest.update(name.encode() + b"\0")
            with open(source / name, "rb") as fin, open(tmp / name, "wb") as fout:
                for block in iter(lambda: fin.read(_BLOCK), b""):
                    digest.update(block)
                    fout.write(block)
        if digest.hexdigest() != sha256:
            raise ExportError(f"artifact {sha256[:12]} changed while it was copied; nothing exported")
        try:
            (tmp / CONFIG).write_bytes(adapter_format.config_naming_base(tmp, base_ref))
        except adapter_format.AdapterFormatError as exc:
            raise ExportError(str(exc)) from None
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
