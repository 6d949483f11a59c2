"""Pruning: a plan first (what would go, why, and the bytes freed), deletion only when
asked. A version an alias points at is never removed, nor the parent (lineage) of a
version that stays. Store folders that no remaining version uses are removed with the
versions."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import select

from hatrack.hashing import sha256_file
from hatrack.registry.errors import RegistryError
from hatrack.registry.store import SHA_RE
from hatrack.registry.tables import AdapterVersion, Alias
from hatrack.registry.views import lower_is_better

if TYPE_CHECKING:
    from hatrack.registry.registry import Registry

_AGE_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '45m', '2w', '90s' -> timedelta."""
    match = _AGE_RE.match(text.strip().lower()) if isinstance(text, str) else None
    if not match:
        raise RegistryError(f"invalid age {text!r}: expected a number and a unit, like 30d, 12h, 45m or 2w")
    return timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


def dataset_digest(file_or_sha: str) -> str:
    """A dataset's sha256: given directly, or computed over the file's bytes."""
    if SHA_RE.match(file_or_sha.lower()):
        return file_or_sha.lower()
    path = Path(file_or_sha).expanduser()
    if not path.is_file():
        raise RegistryError(f"--trained-on {file_or_sha!r}: neither a file nor a sha256")
    return sha256_file(path)


@dataclass
class PruneCriteria:
    name: str | None = None
    tags: dict[str, str] | None = None
    keep_last: int | None = None
    keep_best: int | None = None
    by: str | None = None
    older_than: str | timedelta | None = None
    trained_on: str | None = None  # a file or a sha256

    def validate(self) -> None:
        if self.keep_last is None and self.keep_best is None and self.older_than is None and self.trained_on is None:
            raise RegistryError(
                "nothing to prune by: give --keep-last, --keep-best/--by, --older-than or --trained-on"
            )
        if (self.keep_best is None) != (self.by is None):
            raise RegistryError("--keep-best N and --by METRIC go together")
        for flag, value in (("--keep-last", self.keep_last), ("--keep-best", self.keep_best)):
            if value is not None and value < 0:
                raise RegistryError(f"{flag} must be 0 or more, got {value}")


@dataclass
class PlanItem:
    name: str
    version: int
    sha256: str
    size: int
    created: str
    reasons: list[str]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class PrunePlan:
    remove: list[PlanItem] = field(default_factory=list)
    # would go, but are held: {"label", "why" ("alias prod", "parent of acme@3"), "aliases", "would_go_because"}
    kept: list[dict[str, Any]] = field(default_factory=list)
    free_folders: list[str] = field(default_factory=list)
    freed_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "remove": [dict(asdict(i), label=i.label) for i in self.remove],
            "kept": self.kept,
            "kept_by_alias": [k for k in self.kept if k["aliases"]],
            "free_folders": self.free_folders,
            "freed_bytes": self.freed_bytes,
        }


def plan(reg: "Registry", criteria: PruneCriteria) -> PrunePlan:
    criteria.validate()
    rows = reg.list_versions(name=criteria.name, tags=criteria.tags)
    cutoff = None
    age_text = None
    if criteria.older_than is not None:
        age = criteria.older_than if isinstance(criteria.older_than, timedelta) else parse_age(criteria.older_than)
        age_text = criteria.older_than if isinstance(criteria.older_than, str) else f"{age}"
        cutoff = int((datetime.now(timezone.utc) - age).timestamp())
    trained_on = dataset_digest(criteria.trained_on) if criteria.trained_on else None

    protected: set[tuple[str, int]] = set()
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    for group in by_name.values():
        if criteria.keep_last is not None:
            newest = sorted(group, key=lambda r: r["version"], reverse=True)[: criteria.keep_last]
            protected.update((r["name"], r["version"]) for r in newest)
        if criteria.keep_best is not None:
            metric = criteria.by
            scored = [r for r in group if metric in r["scores"]]
            sign = 1 if lower_is_better(metric) else -1
            best = sorted(scored, key=lambda r: (sign * r["scores"][metric], -r["version"]))[: criteria.keep_best]
            protected.update((r["name"], r["version"]) for r in best)

    result = PrunePlan()
    for row in rows:
        if (row["name"], row["version"]) in protected:
            continue
        if cutoff is not None and row["created_ts"] > cutoff:
            continue
        if trained_on is not None and row["dataset_sha256"] != trained_on:
            continue
        reasons = []
        if criteria.keep_last is not None:
            reasons.append(f"not among the {criteria.keep_last} newest")
        if criteria.keep_best is not None:
            reasons.append(f"not among the {criteria.keep_best} best by {criteria.by}")
        if cutoff is not None:
            reasons.append(f"older than {age_text}")
        if trained_on is not None:
            reasons.append(f"trained on {trained_on[:12]}")
        if row["aliases"]:
            result.kept.append({"label": row["label"], "why": f"alias {', '.join(row['aliases'])}",
                                "aliases": row["aliases"], "would_go_because": reasons})
            continue
        result.remove.append(PlanItem(row["name"], row["version"], row["sha256"], row["size"],
                                      row["created"], reasons))
    _keep_parents(reg, result)
    _count_freed(reg, result)
    return result


def _keep_parents(reg: "Registry", result: PrunePlan) -> None:
    """A version that stays keeps its lineage: the parent it was trained from (and that
    one's parent) is taken off the plan, whatever the filters said."""
    with reg.session() as session:
        parents = {(n, v): p for n, v, p in session.exec(
            select(AdapterVersion.name, AdapterVersion.version, AdapterVersion.parent_version)
            .order_by(AdapterVersion.name, AdapterVersion.version)).all()}
    going = {(i.name, i.version): i for i in result.remove}
    pending = [key for key in parents if key not in going]  # every version that stays
    while pending:
        name, version = pending.pop()
        parent = (name, parents[(name, version)])
        item = going.pop(parent, None) if parent[1] is not None else None
        if item is None:
            continue
        result.kept.append({"label": item.label, "why": f"parent of {name}@{version}", "aliases": [],
                            "would_go_because": item.reasons})
        pending.append(parent)
    result.remove = [i for i in result.remove if (i.name, i.version) in going]
    result.kept.sort(key=lambda k: (k["label"].rsplit("@", 1)[0], int(k["label"].rsplit("@", 1)[1])))


def _referenced(reg: "Registry", exclude: set[tuple[str, int]]) -> set[str]:
    with reg.session() as session:
        rows = session.exec(select(AdapterVersion.name, AdapterVersion.version, AdapterVersion.sha256)).all()
    return {sha for name, version, sha in rows if (name, version) not in exclude}


def _count_freed(reg: "Registry", result: PrunePlan) -> None:
    going = {(i.name, i.version) for i in result.remove}
    still_used = _referenced(reg, going)
    folders = sorted({i.sha256 for i in result.remove} - still_used)
    result.free_folders = folders
    result.freed_bytes = sum(reg.store.size(sha) for sha in folders)


@dataclass
class PruneResult:
    removed: list[str]
    skipped: list[str]  # gained an alias between plan and execution
    removed_folders: list[str]
    freed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def execute(reg: "Registry", result: PrunePlan) -> PruneResult:
    """Delete the planned versions (re-checking aliases now), then the store folders
    that no remaining version uses."""
    with reg.session() as session:
        aliased = {(a.name, a.version) for a in session.exec(select(Alias)).all()}
        ids = {
            (v.name, v.version): v.id
            for v in session.exec(select(AdapterVersion).where(
                AdapterVersion.name.in_(sorted({i.name for i in result.remove})))).all()
        }
    removed, skipped, delete_ids = [], [], []
    for item in result.remove:
        key = (item.name, item.version)
        if key in aliased:
            skipped.append(item.label)
        elif key in ids:
            delete_ids.append(ids[key])
            removed.append(item.label)
    reg.delete_versions(delete_ids)
    still_used = _referenced(reg, set())
    folders, freed = [], 0
    for sha in sorted({i.sha256 for i in result.remove} - still_used):
        size = reg.store.size(sha)
        reg.store.remove(sha)
        folders.append(sha)
        freed += size
    return PruneResult(removed, skipped, folders, freed)
