"""What the registry hands out: plain dataclasses, detached from any database session."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from hatrack.registry import tables


def as_utc(ts: datetime) -> datetime:
    """A stored time as aware UTC (SQLite hands them back without tzinfo)."""
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def iso(ts: datetime | None) -> str | None:
    return as_utc(ts).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else None


def epoch(ts: datetime | None) -> int:
    return int(as_utc(ts).timestamp()) if ts else 0


@dataclass(frozen=True)
class ResolvedModel:
    kind: Literal["base", "adapter"]
    name: str  # adapter name, or base name when kind == "base"
    version: int | None  # None for a base
    base_name: str
    base_fingerprint: str
    sha256: str | None  # artifact sha256 (None for a base)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.kind == "adapter" else self.name


@dataclass
class ScoreIn:
    metric: str
    value: float
    base_value: float | None = None
    dataset_sha256: str | None = None
    split: str = "heldout"
    rows: int | None = None  # how many eval rows the value was computed on
    precision: str | None = None  # base precision it was measured at: bf16, fp32, nf4, int8


@dataclass
class DatasetInfo:
    sha256: str
    rows: int
    source: str


@dataclass(frozen=True)
class BaseRecord:
    name: str
    source: str
    path: Path
    fingerprint: str
    chat_template_sha256: str | None
    created: datetime

    @classmethod
    def of(cls, row: tables.BaseModelRow) -> "BaseRecord":
        return cls(row.name, row.source, Path(row.path), row.fingerprint, row.chat_template_sha256, row.created)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "path": str(self.path),
            "fingerprint": self.fingerprint, "chat_template_sha256": self.chat_template_sha256,
            "created": iso(self.created),
        }


@dataclass(frozen=True)
class VersionRecord:
    id: int
    name: str
    version: int
    status: str
    created: datetime
    base_name: str
    base_fingerprint: str
    base_source: str | None
    quantization: str | None
    parent_version: int | None
    dataset_sha256: str | None
    dataset_rows: int | None
    dataset_source: str | None
    train_config: dict | None
    seed: int | None
    train_metrics: dict | None
    lib_versions: dict | None
    chat_template_sha256: str | None
    sha256: str
    size: int
    lora: dict | None = None  # rank, alpha, target modules, ... from its adapter config
    origin: dict | None = None  # the Hub repository and commit it was pulled from
    # set by register only: earlier versions of this name holding the same artifact bytes
    same_artifact: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def of(cls, row: tables.AdapterVersion) -> "VersionRecord":
        return cls(
            id=row.id, name=row.name, version=row.version, status=row.status, created=row.created,
            base_name=row.base_name, base_fingerprint=row.base_fingerprint, base_source=row.base_source,
            quantization=row.quantization, parent_version=row.parent_version,
            dataset_sha256=row.dataset_sha256, dataset_rows=row.dataset_rows, dataset_source=row.dataset_source,
            train_config=row.train_config, seed=row.seed, train_metrics=row.train_metrics,
            lib_versions=row.lib_versions, chat_template_sha256=row.chat_template_sha256,
            sha256=row.sha256, size=row.size, lora=row.lora, origin=row.origin,
        )


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    patterns: list[str] = field(default_factory=list)
    created: datetime | None = None
    revoked: datetime | None = None

    @classmethod
    def of(cls, row: tables.ApiKey) -> "KeyRecord":
        return cls(row.id, row.tenant, list(row.patterns or []), row.created, row.revoked)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "patterns": self.patterns,
                "created": iso(self.created), "revoked": iso(self.revoked)}
