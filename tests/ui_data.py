"""A small rack for the dashboard tests: two customers' adapters on the tiny base, with
loss curves, held-out scores beside the base's, lineage and tags, as training records them."""

from __future__ import annotations

import math
from pathlib import Path

from hatrack.registry import DatasetInfo, Registry, ScoreIn

BASE = "tiny"


def curve(steps: int, start: float, seed: int) -> list[list[float]]:
    return [[s, round(start * math.exp(-s / 15) + 0.4 + 0.05 * math.sin(s * seed), 4)] for s in range(1, steps + 1)]


def add_version(reg: Registry, folder: Path, name: str, *, steps: int, eval_loss: float, base_loss: float = 3.0,
                parent: int | None = None, tags: dict | None = None, lr: float = 2e-4, seed: int = 1):
    return reg.register(
        folder, name=name, base=BASE, tags=tags or {}, parent_version=parent, quantization="none",
        dataset=DatasetInfo(sha256=f"{seed:064x}", rows=100 + seed, source=f"{name}.jsonl"),
        train_config={"name": name, "rank": 8, "alpha": 16, "lr": lr, "epochs": 1, "max_steps": steps, "seed": seed},
        seed=seed, train_metrics={"final_loss": curve(steps, 3.0, seed)[-1][1], "steps": steps,
                                  "loss_curve": curve(steps, 3.0, seed)},
        lib_versions={"torch": "2.13", "peft": "0.17"},
        scores=[ScoreIn("eval_loss", eval_loss, base_loss, f"{seed:064x}", "heldout", 10, "fp32"),
                ScoreIn("exact_match", 0.5 + seed / 100, 0.1, f"{seed:064x}", "heldout", 10, "fp32")],
    )


def build_rack(reg: Registry, folder: Path) -> None:
    """acme-support@1..3 (3 continues 2; 2 is better than 1, 3 worse than the base) and globex-support@1."""
    add_version(reg, folder, "acme-support", steps=30, eval_loss=2.2, tags={"customer": "acme"}, seed=1)
    add_version(reg, folder, "acme-support", steps=40, eval_loss=1.9, tags={"customer": "acme"}, lr=1e-4, seed=2)
    add_version(reg, folder, "acme-support", steps=12, eval_loss=3.4, parent=2, tags={"customer": "acme"}, seed=3)
    add_version(reg, folder, "globex-support", steps=25, eval_loss=2.5, tags={"customer": "globex"}, seed=4)
