"""The Registry: base models, adapter versions with their lineage, tags, scores and
the artifact store behind them. Aliases, keys, listings, pruning and the store check
live in their own modules; the methods here are thin doors into them."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import and_, delete, func
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import Session, select

from hatrack import settings
from hatrack.adapter_format import AdapterLayout
from hatrack.registry import tables
from hatrack.registry.db import init_schema, make_engine
from hatrack.registry.errors import InvalidNameError, NotFoundError, RegistryError
from hatrack.registry.lineage import check_fits
from hatrack.registry.names import PROD, parse_ref, validate_name, validate_tag_key, validate_tags
from hatrack.registry.records import BaseRecord, DatasetInfo, KeyRecord, ResolvedModel, ScoreIn, VersionRecord
from hatrack.registry.staging import staged
from hatrack.registry.store import ArtifactStore, artifact_files, hash_folder
from hatrack.registry.tables import AdapterVersion, Alias, BaseModelRow, Score, Tag

T = TypeVar("T")
READY = "ready"


class Registry:
    def __init__(self, db_url: str | None = None, store_dir: Path | None = None) -> None:
        self.db_url = db_url or settings.db_url()
        self.engine = make_engine(self.db_url)
        try:
            init_schema(self.engine)
        except (OperationalError, InterfaceError) as exc:
            raise RegistryError(self._db_problem(exc)) from None
        self.store = ArtifactStore(Path(store_dir) if store_dir else settings.store_dir())

    # ------------------------------------------------------------ sessions

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; a database that is unreachable or stays locked becomes one clear line."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
        except (OperationalError, InterfaceError) as exc:
            raise RegistryError(self._db_problem(exc)) from None

    def write(self, fn: Callable[[Session], T], attempts: int = 60) -> T:
        """Run fn in a transaction and commit; a unique-key clash with another writer
        (two processes taking the same version number) or a busy database is retried."""
        for attempt in range(attempts):
            try:
                with Session(self.engine, expire_on_commit=False) as session:
                    result = fn(session)
                    session.commit()
                    return result
            except (IntegrityError, OperationalError, InterfaceError) as exc:
                text = str(exc.orig if getattr(exc, "orig", None) is not None else exc).lower()
                retryable = isinstance(exc, IntegrityError) or "locked" in text or "busy" in text
                if not retryable or attempt == attempts - 1:
                    raise RegistryError(self._db_problem(exc)) from None
                time.sleep(min(0.5, 0.01 * (attempt + 1)) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _db_problem(self, exc: Exception) -> str:
        cause = getattr(exc, "orig", None) or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        where = self.engine.url.render_as_string(hide_password=True)
        condition = _sqlite_disk_condition(self.engine.url, first)
        return f"registry database {where}: {condition} ({first})" if condition else f"registry database {where}: {first}"

    # ------------------------------------------------------------ bases

    def add_base(self, name: str, source: str, path: Path, fingerprint: str,
                 chat_template_sha256: str | None = None) -> BaseRecord:
        """Record a base model. Adding the same name with the same fingerprint again
        returns the record (updating its folder); another fingerprint is refused."""
        validate_name(name)

        def add(session: Session) -> BaseRecord:
            row = session.exec(select(BaseModelRow).where(BaseModelRow.name == name)).first()
            if row is not None:
                if row.fingerprint != fingerprint:
                    raise RegistryError(
                        f"base {name!r} is already registered with fingerprint {row.fingerprint[:12]}, "
                        f"not {fingerprint[:12]}: add the new weights under another name"
                    )
                if row.path != str(path) or row.source != source:
                    row.path, row.source = str(path), source
                    session.add(row)
                return BaseRecord.of(row)
            clash = session.exec(select(AdapterVersion.id).where(AdapterVersion.name == name).limit(1)).first()
            if clash is not None:
                raise InvalidNameError(f"name {name!r} is already used by an adapter; pick another base name")
            row = BaseModelRow(name=name, source=source, path=str(path), fingerprint=fingerprint,
                               chat_template_sha256=chat_template_sha256)
            session.add(row)
            session.flush()
            return BaseRecord.of(row)

        return self.write(add)

    def get_base(self, name: str) -> BaseRecord:
        validate_name(name)
        with self.session() as session:
            row = session.exec(select(BaseModelRow).where(BaseModelRow.name == name)).first()
        if row is None:
            raise NotFoundError(f"unknown base model {name!r} (see `hatrack base list`)")
        return BaseRecord.of(row)

    def list_bases(self) -> list[BaseRecord]:
        with self.session() as session:
            rows = session.exec(select(BaseModelRow).order_by(BaseModelRow.name)).all()
        return [BaseRecord.of(r) for r in rows]

    # ------------------------------------------------------------ register

    def register(self, folder: Path, *, name: str, base: str, tags: dict[str, str] | None = None,
                 parent_version: int | None = None, quantization: str | None = None,
                 dataset: DatasetInfo | None = None, train_config: dict | None = None,
                 seed: int | None = None, train_metrics: dict | None = None,
                 chat_template_sha256: str | None = None, lib_versions: dict[str, str] | None = None,
                 scores: list[ScoreIn] | None = None, origin: dict | None = None) -> VersionRecord:
        """Check that the PEFT folder can be served on `base`, store its artifact (its config
        naming the base, not a local path), record version N+1 with the adapter's shape.
        The record's same_artifact lists earlier versions of `name` with the same bytes;
        origin says where the folder came from (the Hub repository and commit of a pull)."""
        validate_name(name)
        tags = validate_tags(tags)
        scores = [_check_score(s) for s in scores or []]
        if quantization is not None and len(quantization) > 32:
            raise RegistryError(f"quantization {quantization[:40]!r}...: at most 32 characters")
        folder = Path(folder)
        base_rec = self.get_base(base)
        with self.session() as session:
            if session.exec(select(BaseModelRow.id).where(BaseModelRow.name == name)).first() is not None:
                raise InvalidNameError(f"name {name!r} is a base model; pick another adapter name")
            if parent_version is not None and _version_row(session, name, parent_version) is None:
                raise NotFoundError(f"parent version {name}@{parent_version} does not exist")
        artifact_files(folder)
        layout = check_fits(folder, base_rec.path, base_rec.name)
        with staged(folder, base_rec.name, base_rec.source) as stage:
            return self._store_and_insert(stage, name, base_rec, tags, scores, layout, dict(
                quantization=quantization, parent_version=parent_version,
                dataset_sha256=dataset.sha256 if dataset else None,
                dataset_rows=dataset.rows if dataset else None,
                dataset_source=dataset.source if dataset else None,
                train_config=_jsonable(train_config), seed=seed, train_metrics=_jsonable(train_metrics),
                lib_versions=_jsonable(lib_versions), origin=_jsonable(origin),
                chat_template_sha256=chat_template_sha256 or base_rec.chat_template_sha256,
            ))

    def _store_and_insert(self, folder: Path, name: str, base_rec: BaseRecord, tags: dict[str, str],
                          scores: list[ScoreIn], layout: AdapterLayout | None, fields: dict[str, Any]) -> VersionRecord:
        already_stored = self.store.exists(hash_folder(folder))
        sha256, size = self.store.put(folder)

        def insert(session: Session) -> VersionRecord:
            latest = session.exec(select(func.max(AdapterVersion.version)).where(AdapterVersion.name == name)).one()
            # the same bytes registered again still make a version (training twice is
            # legitimate); the record says which versions it repeats
            same = session.exec(select(AdapterVersion.version).where(
                AdapterVersion.name == name, AdapterVersion.sha256 == sha256).order_by(AdapterVersion.version)).all()
            row = AdapterVersion(
                name=name, version=(latest or 0) + 1, status=READY,
                base_name=base_rec.name, base_fingerprint=base_rec.fingerprint, base_source=base_rec.source,
                sha256=sha256, size=size, lora=layout.summary() if layout else None, **fields,
            )
            session.add(row)
            session.flush()
            for key, value in tags.items():
                session.add(Tag(version_id=row.id, key=key, value=value))
            _add_score_rows(session, row.id, scores)
            return dataclasses.replace(VersionRecord.of(row), same_artifact=tuple(f"{name}@{v}" for v in same))

        try:
            record = self.write(insert)
        except RegistryError:
            if not already_stored:
                self._drop_unclaimed(sha256)  # a registration that failed leaves no orphan behind
            raise
        if not self.store.exists(sha256):
            self.store.put(folder)  # a prune removed the shared folder while this version was added
        return record

    def _drop_unclaimed(self, sha256: str) -> None:
        try:
            with self.session() as session:
                claimed = session.exec(select(AdapterVersion.id).where(AdapterVersion.sha256 == sha256).limit(1)).first()
            if claimed is None:
                self.store.remove(sha256)
        except (RegistryError, OSError):
            pass  # cannot tell whether a version uses it: `hatrack check --fix` decides later

    # ------------------------------------------------------------ resolve

    def resolve(self, ref: str) -> ResolvedModel:
        """`name` (prod alias, else newest ready), `name@3`, `name@alias`, or a base name."""
        parsed = parse_ref(ref)
        with self.session() as session:
            if parsed.version is not None:
                row = _version_row(session, parsed.name, parsed.version)
                if row is None or row.status != READY:
                    raise NotFoundError(f"{parsed.name!r} has no version {parsed.version}")
            elif parsed.alias is not None:
                row = session.exec(
                    select(AdapterVersion).join(Alias, and_(
                        Alias.name == AdapterVersion.name, Alias.version == AdapterVersion.version))
                    .where(Alias.name == parsed.name, Alias.alias == parsed.alias)
                ).first()
                if row is None:
                    raise NotFoundError(f"{parsed.name!r} has no alias {parsed.alias!r}")
            else:
                # prod's version first, else the newest ready one: one query
                found = session.exec(
                    select(AdapterVersion, Alias.id).join(Alias, and_(
                        Alias.name == AdapterVersion.name, Alias.alias == PROD,
                        Alias.version == AdapterVersion.version), isouter=True)
                    .where(AdapterVersion.name == parsed.name, AdapterVersion.status == READY)
                    .order_by(Alias.id.is_(None), AdapterVersion.version.desc()).limit(1)
                ).first()
                row = found[0] if found else None
                if row is None:
                    base = session.exec(select(BaseModelRow).where(BaseModelRow.name == parsed.name)).first()
                    if base is None:
                        raise NotFoundError(f"unknown model {parsed.name!r}")
                    return ResolvedModel("base", base.name, None, base.name, base.fingerprint, None)
        return ResolvedModel("adapter", row.name, row.version, row.base_name, row.base_fingerprint, row.sha256)

    def open_artifact(self, sha256: str, verify: bool = True) -> Path:
        """The store folder holding `sha256`, verified against it unless verify=False."""
        return self.store.open(sha256, verify=verify)

    # ------------------------------------------------------------ versions, scores, tags

    def get_version(self, name: str, version: int) -> VersionRecord:
        validate_name(name)
        with self.session() as session:
            row = _version_row(session, name, version)
        if row is None:
            raise NotFoundError(f"{name!r} has no version {version}")
        return VersionRecord.of(row)

    def version_of(self, ref: str) -> VersionRecord:
        """The adapter version a reference names (a base name is an error here)."""
        resolved = self.resolve(ref)
        if resolved.kind != "adapter":
            raise NotFoundError(f"{ref!r} is a base model, not an adapter version")
        return self.get_version(resolved.name, resolved.version)

    def add_scores(self, name: str, version: int, scores: list[ScoreIn]) -> None:
        checked = [_check_score(s) for s in scores]
        record = self.get_version(name, version)
        self.write(lambda session: _add_score_rows(session, record.id, checked))

    def set_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        tags = validate_tags(tags)
        record = self.get_version(name, version)

        def apply(session: Session) -> None:
            existing = {t.key: t for t in session.exec(select(Tag).where(Tag.version_id == record.id)).all()}
            for key, value in tags.items():
                row = existing.get(key) or Tag(version_id=record.id, key=key, value=value)
                row.value = value
                session.add(row)

        self.write(apply)

    def remove_tags(self, name: str, version: int, keys: list[str]) -> list[str]:
        """Remove tags by key; returns the keys that were there."""
        keys = [validate_tag_key(k) for k in keys]
        record = self.get_version(name, version)

        def apply(session: Session) -> list[str]:
            rows = session.exec(select(Tag).where(Tag.version_id == record.id, Tag.key.in_(keys))).all()
            for row in rows:
                session.delete(row)
            return sorted(r.key for r in rows)

        return self.write(apply)

    # ------------------------------------------------------------ listings (views.py)

    def version_info(self, name: str, version: int) -> dict:
        from hatrack.registry import views

        return views.version_info(self, name, version)

    def list_versions(self, name: str | None = None, tags: dict[str, str] | None = None,
                      base: str | None = None, sort: str | None = None) -> list[dict]:
        from hatrack.registry import views

        return views.list_versions(self, name=name, tags=tags, base=base, sort=sort)

    # ------------------------------------------------------------ aliases (aliases.py)

    def set_alias(self, name: str, alias: str, version: int, force: bool = False) -> None:
        from hatrack.registry import aliases

        aliases.set_alias(self, name, alias, version, force=force)

    def delete_alias(self, name: str, alias: str) -> None:
        from hatrack.registry import aliases

        aliases.delete_alias(self, name, alias)

    def alias_history(self, name: str, alias: str | None = None) -> list[dict]:
        from hatrack.registry import aliases

        return aliases.history(self, name, alias)

    # ------------------------------------------------------------ keys (keys.py)

    def create_key(self, tenant: str, patterns: list[str]) -> tuple[KeyRecord, str]:
        from hatrack.registry import keys

        return keys.create_key(self, tenant, patterns)

    def authenticate(self, secret: str) -> KeyRecord | None:
        from hatrack.registry import keys

        return keys.authenticate(self, secret)

    def has_keys(self) -> bool:
        from hatrack.registry import keys

        return keys.has_keys(self)

    def list_keys(self) -> list[KeyRecord]:
        from hatrack.registry import keys

        return keys.list_keys(self)

    def revoke_key(self, key_id: str) -> None:
        from hatrack.registry import keys

        keys.revoke_key(self, key_id)

    # ------------------------------------------------------------ upkeep (prune.py, check.py)

    def plan_prune(self, **criteria: Any):
        from hatrack.registry import prune

        return prune.plan(self, prune.PruneCriteria(**criteria))

    def prune(self, plan):
        from hatrack.registry import prune

        return prune.execute(self, plan)

    def check(self, fix: bool = False):
        from hatrack.registry import check

        return check.check(self, fix=fix)

    def delete_versions(self, ids: list[int]) -> None:
        """Delete version rows with their tags and scores (used by prune)."""
        if not ids:
            return

        def apply(session: Session) -> None:
            session.exec(delete(Tag).where(Tag.version_id.in_(ids)))
            session.exec(delete(Score).where(Score.version_id.in_(ids)))
            session.exec(delete(AdapterVersion).where(AdapterVersion.id.in_(ids)))

        self.write(apply)


# ---------------------------------------------------------------- helpers


def _version_row(session: Session, name: str, version: int) -> tables.AdapterVersion | None:
    return session.exec(
        select(AdapterVersion).where(AdapterVersion.name == name, AdapterVersion.version == int(version))
    ).first()


def _sqlite_disk_condition(url, message: str) -> str | None:
    """'disk full' or 'read-only file system' when the disk under a SQLite file explains
    an error: SQLite itself only says "disk I/O error" or "unable to open database file"."""
    text = message.lower()
    if url.get_backend_name() != "sqlite" or not any(
            hint in text for hint in ("disk i/o", "unable to open", "readonly", "full")):
        return None
    database = url.database or ""
    if database.startswith("file:"):
        if "mode=ro" in database or "mode=ro" in str(url.query):
            return "opened read-only"
        database = database[5:].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    folder = Path(database).expanduser().absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if "full" in text or stats.f_bavail == 0:
        return "disk full"
    return "read-only" if "readonly" in text else None


def _check_score(score: ScoreIn) -> ScoreIn:
    if not isinstance(score.metric, str) or not score.metric or len(score.metric) > 64:
        raise InvalidNameError(f"invalid score metric {score.metric!r}")
    if not isinstance(score.split, str) or not score.split or len(score.split) > 256:
        raise InvalidNameError(f"score {score.metric!r}: split must be 1-256 characters")
    for field, value in (("value", score.value), ("base_value", score.base_value)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise RegistryError(f"score {score.metric!r}: {field} must be a finite number, got {value!r}")
    if score.precision is not None and (not isinstance(score.precision, str) or not 0 < len(score.precision) <= 32):
        raise RegistryError(f"score {score.metric!r}: precision must be 1-32 characters, got {score.precision!r}")
    if score.rows is not None and (isinstance(score.rows, bool) or not isinstance(score.rows, int) or score.rows < 0):
        raise RegistryError(f"score {score.metric!r}: rows must be a count of eval rows, got {score.rows!r}")
    return score


def _add_score_rows(session: Session, version_id: int, scores: list[ScoreIn]) -> None:
    for s in scores:
        session.add(Score(version_id=version_id, metric=s.metric, value=float(s.value),
                          base_value=None if s.base_value is None else float(s.base_value),
                          dataset_sha256=s.dataset_sha256, split=s.split, rows=s.rows,
                          precision=s.precision))


def _jsonable(value: Any) -> Any:
    """A dict stored as JSON: round-trip through json so non-JSON values fail here, clearly."""
    if value is None:
        return None
    import json

    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"cannot store {type(value).__name__} as JSON: {exc}") from None
