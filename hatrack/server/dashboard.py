"""The dashboard on `hatrack serve`: /ui with the registry pages plus the live serving
state and "try it". The dashboard gets only what is public here: the key gate, the
engine's stats() and the Prometheus metrics, each narrowed to what the viewer may see."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI

from hatrack.server.auth import Unauthorized
from hatrack.server.state import ServerState
from hatrack.ui.access import Access
from hatrack.ui.app import Serving, mount_ui


def _label(key: str) -> str:
    return key.split(":")[0]  # engine keys are "name@version:sha256"


def _per_model(state: ServerState) -> dict[str, dict]:
    models: dict[str, dict] = {}

    def entry(model: str) -> dict:
        return models.setdefault(model, {"model": model, "requests": 0, "latency_sum": 0.0, "latency_count": 0,
                                         "tokens": 0})

    m = state.metrics
    for family in m.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                entry(s.labels["model"])["requests"] += int(s.value)
    for family in m.latency.collect():
        for s in family.samples:
            if s.name.endswith("_sum"):
                entry(s.labels["model"])["latency_sum"] += s.value
            elif s.name.endswith("_count"):
                entry(s.labels["model"])["latency_count"] += int(s.value)
    for family in m.tokens.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                entry(s.labels["model"])["tokens"] += int(s.value)
    return models


def snapshot(state: ServerState, visible: Callable[[str], bool]) -> dict:
    """Queue, batch, throughput, where each adapter lives and per-model requests, as JSON."""
    base = state.catalog.base_name if state.catalog else state.config.base
    shown = lambda label: label == base or visible(label.split("@")[0])  # noqa: E731
    out = {"ready": state.ready.is_set(), "base": base, "queue_depth": 0, "running": 0, "tokens_generated": 0,
           "tokens_per_s": 0.0, "device": [], "host": [], "disk": [], "models": []}
    if state.engine is None or state.catalog is None:
        return out
    stats = state.engine.stats()
    busy = stats.prefill_seconds + stats.decode_seconds
    device = [_label(k) for k in stats.loaded_adapters]
    host = [_label(k) for k in stats.host_adapters if _label(k) not in device]
    live = sorted(state.catalog.live_labels() - {base} - set(device) - set(host))
    out.update(queue_depth=stats.queue_depth, running=stats.running, tokens_generated=stats.tokens_generated,
               tokens_per_s=stats.tokens_generated / busy if busy > 0 else 0.0,
               device=[x for x in device if shown(x)], host=[x for x in host if shown(x)],
               disk=[x for x in live if shown(x)])
    rows = []
    for model, e in sorted(_per_model(state).items()):
        if not shown(model):
            continue
        mean = e["latency_sum"] / e["latency_count"] if e["latency_count"] else None
        rows.append({"model": model, "requests": e["requests"], "mean_latency_s": mean, "tokens": e["tokens"]})
    out["models"] = rows
    return out


def models(state: ServerState, visible: Callable[[str], bool]) -> list[str]:
    """The names "try it" offers: the base, then every adapter (and its versions) the viewer may use."""
    base = state.catalog.base_name if state.catalog else state.config.base
    names = [base]
    for row in state.registry.list_versions(base=base):
        if row["status"] == "ready" and visible(row["name"]):
            if row["name"] not in names:
                names.append(row["name"])
            names.append(row["label"])
    return names


def install_dashboard(app: FastAPI, state: ServerState) -> None:
    def lookup(secret: str):
        try:
            return state.gate.caller(f"Bearer {secret}")
        except Unauthorized:
            return None

    access = Access(lookup, open_access=not state.config.auth)
    mount_ui(app, state.registry, access,
             Serving(snapshot=lambda visible: snapshot(state, visible), models=lambda visible: models(state, visible)))
