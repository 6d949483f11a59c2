"""`hatrack check`: every version's artifact exists and hashes to its sha256; every
store folder belongs to a version. --fix removes orphan folders (nothing else is
fixable without the original files)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlmodel import select

from hatrack.registry.errors import ArtifactError
from hatrack.registry.store import SHA_RE, TMP_PREFIX, hash_folder
from hatrack.registry.tables import AdapterVersion

if TYPE_CHECKING:
    from hatrack.registry.registry import Registry

# A folder younger than this may belong to a registration still in flight.
ORPHAN_GRACE_S = 60.0
TMP_GRACE_S = 600.0


@dataclass
class Problem:
    kind: str  # missing | corrupt | orphan
    target: str  # sha256 or store entry name
    detail: str
    versions: list[str] = field(default_factory=list)
    fixed: bool = False


@dataclass
class CheckReport:
    versions: int
    artifacts: int
    store_entries: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return all(p.fixed for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "versions": self.versions, "artifacts": self.artifacts,
                "store_entries": self.store_entries, "problems": [asdict(p) for p in self.problems]}


def check(reg: "Registry", fix: bool = False) -> CheckReport:
    with reg.session() as session:
        rows = session.exec(select(AdapterVersion.name, AdapterVersion.version, AdapterVersion.sha256)).all()
    users: dict[str, list[str]] = {}
    for name, version, sha in rows:
        users.setdefault(sha, []).append(f"{name}@{version}")
    problems: list[Problem] = []
    for sha, labels in sorted(users.items()):
        folder = reg.store.root / sha
        if not folder.is_dir():
            problems.append(Problem("missing", sha, "artifact folder is missing from the store", labels))
            continue
        try:
            actual = hash_folder(folder)
        except ArtifactError as exc:
            problems.append(Problem("corrupt", sha, str(exc).replace(str(reg.store.root) + "/", ""), labels))
            continue
        if actual != sha:
            problems.append(Problem("corrupt", sha, f"files hash to {actual[:12]}, not the recorded sha256", labels))
    entries = reg.store.entries()
    now = time.time()
    for entry in entries:
        if entry in users:
            continue
        path = reg.store.root / entry
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < (TMP_GRACE_S if entry.startswith(TMP_PREFIX) else ORPHAN_GRACE_S):
            continue  # possibly a registration in flight
        what = ("an unfinished temporary folder" if entry.startswith(TMP_PREFIX)
                else "no version uses it" if SHA_RE.match(entry) else "not an artifact folder")
        problem = Problem("orphan", entry, what)
        if fix:
            reg.store.remove(entry)
            problem.fixed = True
        problems.append(problem)
    return CheckReport(len(rows), len(users), len(entries), problems)
