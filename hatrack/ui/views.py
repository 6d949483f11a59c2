"""What each page shows, as plain dicts for the templates: read from the registry and
narrowed to what the viewer may see. No FastAPI here, no engine."""

from __future__ import annotations

import json
from typing import Any

from hatrack.registry import NotFoundError, Registry, parse_ref
from hatrack.registry.aliases import gate_numbers
from hatrack.registry.views import lower_is_better
from hatrack.ui.access import Viewer
from hatrack.ui.charts import Series, bar_chart, line_chart



def fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def rack(reg: Registry, viewer: Viewer, *, name: str | None, tags: dict[str, str], base: str | None,
         sort: str | None) -> list[dict]:
    """`hatrack list`'s rows (same filters, same sort and its errors) the viewer may see."""
    rows = reg.list_versions(name=name or None, tags=tags, base=base or None, sort=sort or None)
    return [r for r in rows if viewer.sees(r["name"])]


def visible_version(reg: Registry, viewer: Viewer, ref: str) -> dict[str, Any]:
    """version_info of NAME@V (or NAME, NAME@ALIAS); one NotFoundError for unknown and hidden alike."""
    name = parse_ref(ref).name
    if not viewer.sees(name):
        raise NotFoundError(f"no adapter {ref!r}")
    record = reg.version_of(ref)
    return reg.version_info(record.name, record.version)


def loss_series(info: dict) -> Series:
    metrics = info.get("train_metrics") or {}
    curve = [(float(x), float(y)) for x, y in metrics.get("loss_curve") or []]
    last_step = curve[-1][0] if curve else float(metrics.get("steps") or 0)
    # eval loss: an eval curve when the run logged one, else each held-out eval_loss at the last step
    evals = [(float(x), float(y)) for x, y in metrics.get("eval_curve") or []]
    if not evals:
        evals = [(last_step, r["value"]) for r in info["score_rows"] if r["metric"] == "eval_loss"]
    return Series(info["label"], curve, evals)


def parent_chain(reg: Registry, info: dict) -> list[str]:
    chain, parent, seen = [], info.get("parent_version"), set()
    while parent is not None and parent not in seen:
        seen.add(parent)
        chain.append(f"{info['name']}@{parent}")
        try:
            parent = reg.get_version(info["name"], parent).parent_version
        except NotFoundError:
            break
    return chain


def version_page(reg: Registry, viewer: Viewer, ref: str, api_url: str) -> dict[str, Any]:
    info = visible_version(reg, viewer, ref)
    bars = [(m, [(info["label"], v), (info["base"], info["base_scores"].get(m))]) for m, v in info["scores"].items()]
    label = info["label"]
    config = info.get("train_config") or {}
    return {
        "info": info,
        "chain": parent_chain(reg, info),
        "loss_chart": line_chart([loss_series(info)]),
        "curve_points": len((info.get("train_metrics") or {}).get("loss_curve") or []),
        "score_chart": bar_chart(bars),
        "config": sorted(config.items()),
        "gate": gate_numbers(reg, info["name"], info["version"]),
        "versions": [r["version"] for r in reg.list_versions(name=info["name"])],
        "snippets": snippets(label, api_url),
        "json": json.dumps,
    }


def snippets(model: str, api_url: str) -> dict[str, str]:
    return {
        "cli": f"hatrack show {model}",
        "curl": (f"curl {api_url}/v1/chat/completions \\\n  -H 'Authorization: Bearer $HATRACK_KEY' \\\n"
                 f"  -H 'Content-Type: application/json' \\\n"
                 f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"),
        "openai": (f"from openai import OpenAI\n\nclient = OpenAI(base_url=\"{api_url}/v1\", api_key=\"$HATRACK_KEY\")\n"
                   f"reply = client.chat.completions.create(\n    model=\"{model}\",\n"
                   f"    messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}],\n)\n"
                   f"print(reply.choices[0].message.content)"),
    }


def compare_page(reg: Registry, viewer: Viewer, refs: list[str]) -> dict[str, Any]:
    infos = [visible_version(reg, viewer, ref) for ref in refs]
    keys = sorted({k for i in infos for k in (i.get("train_config") or {})})
    config_rows = []
    for key in keys:
        values = [json.dumps((i.get("train_config") or {}).get(key), default=str) for i in infos]
        config_rows.append({"key": key, "values": values, "differs": len(set(values)) > 1})
    for key in ("base", "base_fingerprint", "dataset_sha256", "dataset_rows", "seed", "quantization", "sha256", "size"):
        values = [json.dumps(i.get(key), default=str) for i in infos]
        config_rows.append({"key": key, "values": values, "differs": len(set(values)) > 1})
    metrics = sorted({m for i in infos for m in i["scores"]})
    first = infos[0]["scores"] if infos else {}
    score_rows = []
    for m in metrics:
        cells = []
        for i in infos:
            v = i["scores"].get(m)
            delta = None if v is None or first.get(m) is None or i is infos[0] else v - first[m]
            better = None if not delta else (delta < 0) == lower_is_better(m)
            cells.append({"value": v, "delta": delta, "better": better, "base": i["base_scores"].get(m)})
        score_rows.append({"metric": m, "cells": cells})
    return {"infos": infos, "config_rows": config_rows, "score_rows": score_rows,
            "chart": line_chart([loss_series(i) for i in infos])}
