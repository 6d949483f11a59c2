"""Read-only views: the rows `hatrack list` shows and everything `hatrack show` prints.
A listing is three queries whatever its length (versions, then their tags, scores and
aliases in bulk)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row
from sqlmodel import select

from hatrack.registry.errors import NotFoundError, RegistryError
from hatrack.registry.names import validate_name, validate_tags
from hatrack.registry.records import epoch, iso
from hatrack.registry.tables import AdapterVersion, Alias, AliasHistory, BaseModelRow, Score, Tag

if TYPE_CHECKING:
    from hatrack.registry.registry import Registry

_PLAIN_SORTS = {"name", "version", "created", "size", "base"}


def lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return "loss" in m or "perplexity" in m or m == "ppl"


class _Shown:
    """The score shown for each metric of a version: the newest one, whatever its split,
    so `hatrack eval` results show up in listings at once. (The promotion gate reads
    held-out rows itself, in aliases.py.)"""

    def __init__(self, scores: list[Score | Row]) -> None:
        newest: dict[str, Score | Row] = {}
        for s in scores:
            cur = newest.get(s.metric)
            if cur is None or (s.created, s.id) > (cur.created, cur.id):
                newest[s.metric] = s
        self.by_metric = dict(sorted(newest.items()))

    def fields(self) -> dict[str, dict]:
        shown = self.by_metric.items()
        return {
            "scores": {m: s.value for m, s in shown},
            "base_scores": {m: s.base_value for m, s in shown},
            # where each shown score came from: "heldout" (the training run) or "eval:<file>"
            "score_splits": {m: s.split for m, s in shown},
            "score_precisions": {m: s.precision for m, s in shown},
        }


def _row_dict(v: AdapterVersion | Row, tags: dict[str, str], scores: list[Score | Row], aliases: list[str]) -> dict[str, Any]:
    return {
        "name": v.name, "version": v.version, "label": f"{v.name}@{v.version}", "status": v.status,
        "created": iso(v.created), "created_ts": epoch(v.created),
        "base": v.base_name, "base_fingerprint": v.base_fingerprint, "quantization": v.quantization,
        "parent_version": v.parent_version, "dataset_sha256": v.dataset_sha256,
        "dataset_rows": v.dataset_rows, "dataset_source": v.dataset_source, "seed": v.seed,
        "sha256": v.sha256, "size": v.size, "tags": tags, **_Shown(scores).fields(),
        "aliases": sorted(aliases), "lora": v.lora,
    }


def check_sort(sort: str, rows: list[dict]) -> None:
    """An unknown --sort is an error naming what would work: the plain sorts and the
    metrics recorded in the versions being listed."""
    metrics = sorted({m for r in rows for m in r["scores"]})
    if sort in _PLAIN_SORTS or sort in metrics:
        return
    plain = ", ".join(sorted(_PLAIN_SORTS))
    recorded = (f", or a metric the listed versions record: {', '.join(metrics)}" if metrics
                else " (the listed versions record no metrics)")
    raise RegistryError(f"unknown sort key {sort!r}: use one of {plain}{recorded}")


def _sort_key(sort: str):
    if sort in _PLAIN_SORTS:
        field = {"created": "created_ts", "base": "base"}.get(sort, sort)
        return lambda r: (r[field], r["name"], r["version"]), sort in ("created", "size")
    sign = 1 if lower_is_better(sort) else -1
    # versions without the metric go last, in name/version order
    return (lambda r: (sort not in r["scores"], sign * r["scores"].get(sort, 0.0), r["name"], r["version"])), False


# What a listing reads, as plain result rows rather than model instances: building an ORM
# object per version, tag and score cost more than the queries themselves on a rack of
# 1,000 versions. The rows carry the same attribute names, so _row_dict and _Shown take both.
_LISTED = (AdapterVersion.id, AdapterVersion.name, AdapterVersion.version, AdapterVersion.status,
           AdapterVersion.created, AdapterVersion.base_name, AdapterVersion.base_fingerprint,
           AdapterVersion.quantization, AdapterVersion.parent_version, AdapterVersion.dataset_sha256,
           AdapterVersion.dataset_rows, AdapterVersion.dataset_source, AdapterVersion.seed,
           AdapterVersion.sha256, AdapterVersion.size, AdapterVersion.lora)
_SCORE_SHOWN = (Score.version_id, Score.id, Score.metric, Score.value, Score.base_value, Score.split,
                Score.created, Score.precision)


def list_versions(reg: "Registry", name: str | None = None, tags: dict[str, str] | None = None,
                  base: str | None = None, sort: str | None = None) -> list[dict]:
    tags = validate_tags(tags)
    # a listing shows none of the big JSON columns (loss curves, configs): not selected, not decoded
    stmt = select(*_LISTED)
    if name is not None:
        stmt = stmt.where(AdapterVersion.name == validate_name(name))
    if base is not None:
        stmt = stmt.where(AdapterVersion.base_name == validate_name(base))
    for key, value in tags.items():
        stmt = stmt.where(AdapterVersion.id.in_(select(Tag.version_id).where(Tag.key == key, Tag.value == value)))
    with reg.session() as session:
        versions = session.exec(stmt.order_by(AdapterVersion.name, AdapterVersion.version)).all()
        ids = [v.id for v in versions]
        tag_map: dict[int, dict[str, str]] = defaultdict(dict)
        score_map: dict[int, list[Any]] = defaultdict(list)
        alias_map: dict[tuple[str, int], list[str]] = defaultdict(list)
        if ids:
            for version_id, key, value in session.exec(
                    select(Tag.version_id, Tag.key, Tag.value).where(Tag.version_id.in_(ids)).order_by(Tag.key)):
                tag_map[version_id][key] = value
            for s in session.exec(select(*_SCORE_SHOWN).where(Score.version_id.in_(ids))):
                score_map[s.version_id].append(s)
            names = sorted({v.name for v in versions})
            for alias_name, version, alias in session.exec(
                    select(Alias.name, Alias.version, Alias.alias).where(Alias.name.in_(names))):
                alias_map[(alias_name, version)].append(alias)
    rows = [_row_dict(v, tag_map[v.id], score_map[v.id], alias_map[(v.name, v.version)]) for v in versions]
    if sort:
        check_sort(sort, rows)
        key, reverse = _sort_key(sort)
        rows.sort(key=key, reverse=reverse)
    return rows


def version_info(reg: "Registry", name: str, version: int) -> dict[str, Any]:
    """Everything recorded about one version, JSON-ready."""
    record = reg.get_version(name, version)
    with reg.session() as session:
        v = session.get(AdapterVersion, record.id)
        if v is None:
            raise NotFoundError(f"{name!r} has no version {version}")
        tags = {t.key: t.value for t in session.exec(select(Tag).where(Tag.version_id == v.id).order_by(Tag.key))}
        scores = session.exec(select(Score).where(Score.version_id == v.id).order_by(Score.created, Score.id)).all()
        aliases = [a.alias for a in session.exec(select(Alias).where(Alias.name == name, Alias.version == version))]
        history = session.exec(
            select(AliasHistory).where(AliasHistory.name == name).order_by(AliasHistory.id)
        ).all()
        base = session.exec(select(BaseModelRow).where(BaseModelRow.name == v.base_name)).first()
    info = _row_dict(v, tags, list(scores), aliases)
    info.update({
        "base_source": v.base_source,
        "base_matches_registered": bool(base and base.fingerprint == v.base_fingerprint),
        "dataset": None if v.dataset_sha256 is None else
        {"sha256": v.dataset_sha256, "rows": v.dataset_rows, "source": v.dataset_source},
        "train_config": v.train_config, "train_metrics": v.train_metrics, "lib_versions": v.lib_versions,
        "chat_template_sha256": v.chat_template_sha256,
        "origin": v.origin,
        "artifact": {"sha256": v.sha256, "size": v.size},
        "score_rows": [
            {"metric": s.metric, "value": s.value, "base_value": s.base_value,
             "dataset_sha256": s.dataset_sha256, "split": s.split, "rows": s.rows,
             "precision": s.precision, "created": iso(s.created)}
            for s in scores
        ],
        "alias_history": [
            {"alias": h.alias, "from_version": h.from_version, "to_version": h.to_version,
             "forced": h.forced, "when": iso(h.created)}
            for h in history if version in (h.from_version, h.to_version)
        ],
    })
    return info
