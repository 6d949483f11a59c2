"""`hatrack train` and `hatrack eval`: thin calls into hatrack.trainer."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer


def _tags(pairs: Optional[List[str]]) -> dict[str, str]:
    from hatrack.registry.names import parse_tag

    return dict(parse_tag(p) for p in pairs or [])


def _score_lines(scores) -> list[str]:
    lines = []
    for s in scores:
        base = f"  (base {s.base_value:.4g})" if s.base_value is not None else ""
        lines.append(f"  {s.metric:<12} {s.value:.4g}{base}")
    return lines


def _scores_json(scores) -> list[dict]:
    return [
        {"metric": s.metric, "value": s.value, "base_value": s.base_value, "split": s.split,
         "dataset_sha256": s.dataset_sha256}
        for s in scores
    ]


def train(
    data: str = typer.Option(..., "--data", help="JSONL, JSON, CSV or Parquet file, or a Hugging Face dataset name."),
    name: str = typer.Option(..., "--name", help="Adapter name; each run adds a version."),
    base: str = typer.Option("smollm2-135m", "--base", help="Registered base model."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="k=v tag for the new version (repeatable)."),
    eval_split: float = typer.Option(0.1, "--eval-split", help="Share of rows held out for evaluation (0 = none)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the training rows."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs)."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank."),
    alpha: int = typer.Option(32, "--alpha", help="LoRA alpha."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate."),
    targets: str = typer.Option("all-linear", "--targets", help="all-linear, or comma-separated module names."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | int8 | none (default: best for this machine)."),
    seed: int = typer.Option(42, "--seed", help="Seed for the split, LoRA init and data order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of this name and data."),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Write a checkpoint every N steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per step."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per row; longer rows are cut."),
    parent: Optional[str] = typer.Option(None, "--parent", help="NAME@V: continue training from that version."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Train a LoRA adapter on a dataset, evaluate it against its base, register it."""
    from hatrack.registry import Registry
    from hatrack.trainer import TrainConfig
    from hatrack.trainer import train as run_training

    config = TrainConfig(
        data=data, name=name, base=base, tags=_tags(tag), eval_split=eval_split, epochs=epochs,
        max_steps=max_steps, rank=rank, alpha=alpha, lr=lr, targets=targets, quantize=quantize,
        seed=seed, resume=resume, save_steps=save_steps, batch_size=batch_size, max_length=max_length,
        parent=parent,
    )
    outcome = run_training(config, Registry(), progress=True)
    if as_json:
        metrics = {k: v for k, v in outcome.metrics.items() if k not in ("loss_curve", "heldout_samples")}
        print(json.dumps({
            "name": outcome.name, "version": outcome.version, "sha256": outcome.sha256,
            "artifact_dir": str(outcome.artifact_dir), "scores": _scores_json(outcome.scores), "metrics": metrics,
        }, indent=2))
        return
    m = outcome.metrics
    print(f"registered {outcome.name}@{outcome.version}  (sha256 {outcome.sha256[:12]})")
    print(f"  trained {m['steps']} steps in {m['runtime_s']:.0f}s, {m['tokens_per_s']:.0f} tokens/s, "
          f"final loss {m['final_loss']:.4f}")
    if outcome.scores:
        print(f"  held-out scores ({m['heldout_rows']} rows):")
        print("\n".join(_score_lines(outcome.scores)))
    print(f"  stored in {outcome.artifact_dir}")


def eval_cmd(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION of an adapter."),
    data: str = typer.Option(..., "--data", help="JSONL, JSON, CSV or Parquet file, or a Hugging Face dataset name."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="Load the base as nf4 | int8 | none (default: as the version was trained)."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Score an adapter version and its base on a dataset; add the scores to that version."""
    from hatrack.registry import Registry
    from hatrack.trainer import evaluate

    scores = evaluate(Registry(), ref, data, quantize=quantize, progress=not as_json)
    if as_json:
        print(json.dumps(_scores_json(scores), indent=2))
        return
    split = scores[0].split if scores else "-"
    print(f"scores added to {ref} (split {split}):")
    print("\n".join(_score_lines(scores)))
    sys.stdout.flush()


def install(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
