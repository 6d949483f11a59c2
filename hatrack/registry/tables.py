"""SQLModel tables of the registry. Plain portable SQL types (SQLite now, PostgreSQL
later); JSON columns use SQLAlchemy's JSON type, which both support."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, ForeignKey, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

# 1: the first release; 2: scores.rows; 3: scores.precision and adapter_versions.lora;
# 4: adapter_versions.origin.
# Steps between versions: migrations.py.
SCHEMA_VERSION = 4


def utcnow() -> datetime:
    """Times are stored as UTC."""
    return datetime.now(timezone.utc)


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int


class BaseModelRow(SQLModel, table=True):
    __tablename__ = "base_models"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    source: str
    path: str
    fingerprint: str = Field(max_length=64)
    chat_template_sha256: Optional[str] = Field(default=None, max_length=64)
    created: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapter_name_version"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    version: int
    status: str = Field(default="ready", max_length=16)
    created: datetime = Field(default_factory=utcnow)
    base_name: str = Field(index=True, max_length=64)
    base_fingerprint: str = Field(max_length=64)
    base_source: Optional[str] = None
    quantization: Optional[str] = Field(default=None, max_length=32)
    parent_version: Optional[int] = None
    dataset_sha256: Optional[str] = Field(default=None, index=True, max_length=64)
    dataset_rows: Optional[int] = None
    dataset_source: Optional[str] = None
    train_config: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    seed: Optional[int] = None
    train_metrics: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    lib_versions: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    chat_template_sha256: Optional[str] = Field(default=None, max_length=64)
    sha256: str = Field(index=True, max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    # the adapter's own shape, read from its config at register: rank, alpha, targets, ...
    lora: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    # where the artifact came from when it was not trained or registered from a folder here:
    # {"kind": "hub", "endpoint", "repo_id", "revision", "commit"} for a Hub pull
    origin: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))


class Tag(SQLModel, table=True):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("version_id", "key", name="uq_tag_version_key"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    version_id: int = Field(
        sa_column=Column(Integer, ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True, nullable=False)
    )
    key: str = Field(max_length=64)
    value: str = Field(max_length=256)


class Score(SQLModel, table=True):
    __tablename__ = "scores"
    id: Optional[int] = Field(default=None, primary_key=True)
    version_id: int = Field(
        sa_column=Column(Integer, ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True, nullable=False)
    )
    metric: str = Field(max_length=64)
    value: float
    base_value: Optional[float] = None
    dataset_sha256: Optional[str] = Field(default=None, max_length=64)
    split: str = Field(default="heldout", max_length=256)
    created: datetime = Field(default_factory=utcnow)
    rows: Optional[int] = None  # eval rows the score was computed on (None: not recorded)
    # the base precision the score was measured at ("bf16", "fp32", "nf4", "int8"; None: not recorded)
    precision: Optional[str] = Field(default=None, max_length=32)


class Alias(SQLModel, table=True):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("name", "alias", name="uq_alias_name_alias"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    alias: str = Field(max_length=64)
    version: int
    updated: datetime = Field(default_factory=utcnow)


class AliasHistory(SQLModel, table=True):
    """Append-only: one row per move (to_version None when the alias was deleted)."""

    __tablename__ = "alias_history"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    alias: str = Field(max_length=64)
    from_version: Optional[int] = None
    to_version: Optional[int] = None
    forced: bool = False
    created: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True, max_length=32)
    tenant: str = Field(max_length=64)
    patterns: list[str] = Field(sa_column=Column(JSON, nullable=False))
    secret_sha256: str = Field(index=True, unique=True, max_length=64)
    created: datetime = Field(default_factory=utcnow)
    revoked: Optional[datetime] = None
