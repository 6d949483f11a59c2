"""The dashboard's changes, each through the same registry function as its CLI
command, so the guarantees are the same: an alias moves through the prod gate
(`hatrack alias`), tags are checked like `hatrack tag`'s, and a prune deletes only a
plan the viewer saw and confirmed (`hatrack prune` then `--yes`)."""

from __future__ import annotations

from typing import Any, Mapping

from hatrack.registry import NotFoundError, Registry, RegistryError
from hatrack.registry.names import parse_tag
from hatrack.ui.access import Viewer
from hatrack.humanize import human_size
from hatrack.ui.views import visible_version

PRUNE_FIELDS = ("name", "tag", "keep_last", "keep_best", "by", "older_than")


def parse_tags(pairs: list[str]) -> dict[str, str]:
    return dict(parse_tag(p) for p in pairs)


def move_alias(reg: Registry, viewer: Viewer, ref: str, form: Mapping[str, Any]) -> str:
    info = visible_version(reg, viewer, ref)
    alias = str(form.get("alias") or "").strip()
    force = form.get("force") == "on"
    if not alias:
        raise RegistryError("name the alias to move (e.g. prod or staging)")
    reg.set_alias(info["name"], alias, info["version"], force=force)
    return f"{info['name']}@{alias} -> {info['label']}" + (" (forced)" if force else "")


def tag(reg: Registry, viewer: Viewer, ref: str, form: Mapping[str, Any]) -> str:
    info = visible_version(reg, viewer, ref)
    text = str(form.get("tags") or "").split()
    if not text:
        raise RegistryError("give one or more key=value tags")
    tags = parse_tags(text)
    reg.set_tags(info["name"], info["version"], tags)
    return f"{info['label']}: " + " ".join(f"{k}={v}" for k, v in tags.items())


def _int(form: Mapping[str, Any], key: str) -> int | None:
    value = str(form.get(key) or "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise RegistryError(f"{key.replace('_', ' ')}: expected a whole number, got {value!r}")
    return int(value)


def _plan(reg: Registry, viewer: Viewer, form: Mapping[str, Any]):
    name = str(form.get("name") or "").strip() or None
    if not viewer.admin:
        raise RegistryError("read-only: pruning needs an admin key")
    tags = parse_tags(str(form.get("tag") or "").split())
    return reg.plan_prune(name=name, tags=tags, keep_last=_int(form, "keep_last"),
                          keep_best=_int(form, "keep_best"), by=str(form.get("by") or "").strip() or None,
                          older_than=str(form.get("older_than") or "").strip() or None)


def prune_plan(reg: Registry, viewer: Viewer, form: Mapping[str, Any]) -> dict:
    plan = _plan(reg, viewer, form).to_dict()
    plan["labels"] = ",".join(i["label"] for i in plan["remove"])
    plan["freed"] = human_size(plan["freed_bytes"])
    return plan


def prune_confirmed(reg: Registry, viewer: Viewer, form: Mapping[str, Any]) -> str:
    """Plan again and delete only when it is the plan that was shown; otherwise nothing
    is deleted and the viewer sees the new plan."""
    plan = _plan(reg, viewer, form)
    labels = ",".join(i.label for i in plan.remove)
    if labels != str(form.get("labels") or ""):
        raise RegistryError("the plan changed since it was shown (the rack changed): nothing was deleted; "
                            "review the new plan")
    if not plan.remove:
        raise NotFoundError("nothing to prune")
    result = reg.prune(plan)
    skipped = f"; kept {', '.join(result.skipped)} (an alias now points at it)" if result.skipped else ""
    return f"deleted {len(result.removed)} versions, freed {human_size(result.freed_bytes)}{skipped}"
