"""Aliases (`acme-support@prod`) with an append-only history of every move, and the
promotion gate on `prod`: a version whose held-out eval loss is worse than the base's
on the same rows, or worse than the current prod's, is refused unless forced; so is a
version with no eval loss at all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlmodel import Session, select

from hatrack.registry.errors import GateError, NotFoundError
from hatrack.registry.names import PROD, validate_alias, validate_name
from hatrack.registry.records import iso
from hatrack.registry.tables import AdapterVersion, Alias, AliasHistory, Score, utcnow

if TYPE_CHECKING:
    from hatrack.registry.registry import Registry

GATE_METRIC = "eval_loss"


def latest_score(session: Session, version_id: int, metric: str, split: str = "heldout") -> Score | None:
    return session.exec(
        select(Score).where(Score.version_id == version_id, Score.metric == metric, Score.split == split)
        .order_by(Score.created.desc(), Score.id.desc()).limit(1)
    ).first()


def _eval_fallback(session: Session, version_id: int) -> Score | None:
    """A version trained without held-out rows (--eval-split 0, or registered from a
    folder) is judged by its newest `hatrack eval` score: rows it was not trained on too."""
    return session.exec(
        select(Score).where(Score.version_id == version_id, Score.metric == GATE_METRIC,
                            Score.split.startswith("eval:"))
        .order_by(Score.created.desc(), Score.id.desc()).limit(1)
    ).first()


def _comparable(session: Session, version_id: int, score: Score) -> Score | None:
    """Current prod's score to hold `score` against: its held-out one for a held-out
    score; for an eval score, prod's newest on the same data (else nothing to compare)."""
    if score.split == "heldout":
        return latest_score(session, version_id, GATE_METRIC)
    return session.exec(
        select(Score).where(Score.version_id == version_id, Score.metric == GATE_METRIC,
                            Score.dataset_sha256 == score.dataset_sha256)
        .order_by(Score.created.desc(), Score.id.desc()).limit(1)
    ).first()


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _gate(session: Session, target: AdapterVersion, current: Alias | None) -> None:
    label = f"{target.name}@{target.version}"
    score = latest_score(session, target.id, GATE_METRIC)
    if score is None:
        score = _eval_fallback(session, target.id)
    if score is None:  # a promotion nothing vouches for is a decision, not a default
        raise GateError(
            f"refusing to promote {label} to {PROD}: it has no held-out {GATE_METRIC} to compare; "
            f"score it with `hatrack eval {label} --data FILE`, or use --force to promote anyway"
        )
    if score.base_value is not None and score.value > score.base_value:
        raise GateError(
            f"refusing to promote {label} to {PROD}: its {GATE_METRIC} {_fmt(score.value)} is worse than "
            f"the base model's {_fmt(score.base_value)} on the same rows (use --force to promote anyway)"
        )
    if current is None or current.version == target.version:
        return
    prod_row = session.exec(
        select(AdapterVersion).where(AdapterVersion.name == target.name, AdapterVersion.version == current.version)
    ).first()
    prod_score = _comparable(session, prod_row.id, score) if prod_row else None
    if prod_score is not None and score.value > prod_score.value:
        raise GateError(
            f"refusing to promote {label} to {PROD}: its {GATE_METRIC} {_fmt(score.value)} is worse than "
            f"{target.name}@{current.version} (current {PROD}) at {_fmt(prod_score.value)} "
            f"(use --force to promote anyway)"
        )


def gate_numbers(reg: "Registry", name: str, version: int) -> dict:
    """What the prod gate would compare for promoting name@version, read-only: the
    version's eval_loss and where it came from, the base's value on the same rows, and
    the current prod's comparable value (None where there is none)."""
    validate_name(name)
    with reg.session() as session:
        target = session.exec(
            select(AdapterVersion).where(AdapterVersion.name == name, AdapterVersion.version == int(version))
        ).first()
        if target is None:
            raise NotFoundError(f"{name!r} has no version {version}")
        score = latest_score(session, target.id, GATE_METRIC) or _eval_fallback(session, target.id)
        current = session.exec(select(Alias).where(Alias.name == name, Alias.alias == PROD)).first()
        prod_value = None
        if score is not None and current is not None and current.version != target.version:
            prod_row = session.exec(select(AdapterVersion).where(
                AdapterVersion.name == name, AdapterVersion.version == current.version)).first()
            prod_score = _comparable(session, prod_row.id, score) if prod_row else None
            prod_value = prod_score.value if prod_score else None
    return {"metric": GATE_METRIC, "value": score.value if score else None,
            "split": score.split if score else None, "base_value": score.base_value if score else None,
            "prod_version": current.version if current else None, "prod_value": prod_value}


def set_alias(reg: "Registry", name: str, alias: str, version: int, force: bool = False) -> None:
    validate_name(name)
    validate_alias(alias)

    def apply(session: Session) -> None:
        target = session.exec(
            select(AdapterVersion).where(AdapterVersion.name == name, AdapterVersion.version == int(version))
        ).first()
        if target is None:
            raise NotFoundError(f"{name!r} has no version {version}")
        current = session.exec(select(Alias).where(Alias.name == name, Alias.alias == alias)).first()
        if alias == PROD and not force:
            _gate(session, target, current)
        previous = current.version if current else None
        if current is not None and previous == target.version:
            return  # already there: no move to record
        row = current or Alias(name=name, alias=alias, version=target.version)
        row.version, row.updated = target.version, utcnow()
        session.add(row)
        session.add(AliasHistory(name=name, alias=alias, from_version=previous, to_version=target.version,
                                 forced=bool(force)))

    reg.write(apply)


def delete_alias(reg: "Registry", name: str, alias: str) -> None:
    validate_name(name)
    validate_alias(alias)

    def apply(session: Session) -> None:
        row = session.exec(select(Alias).where(Alias.name == name, Alias.alias == alias)).first()
        if row is None:
            raise NotFoundError(f"{name!r} has no alias {alias!r}")
        session.add(AliasHistory(name=name, alias=alias, from_version=row.version, to_version=None))
        session.delete(row)

    reg.write(apply)


def history(reg: "Registry", name: str, alias: str | None = None) -> list[dict]:
    validate_name(name)
    with reg.session() as session:
        stmt = select(AliasHistory).where(AliasHistory.name == name)
        if alias is not None:
            stmt = stmt.where(AliasHistory.alias == alias)
        rows = session.exec(stmt.order_by(AliasHistory.id)).all()
    return [{"alias": r.alias, "from_version": r.from_version, "to_version": r.to_version,
             "forced": r.forced, "when": iso(r.created)} for r in rows]
