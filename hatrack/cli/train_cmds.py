"""`hatrack train` and `hatrack eval`: thin calls into hatrack.trainer."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from typing import Any, List, Optional

import typer

from hatrack.errors import HatrackError


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


def _train_parameters() -> list[inspect.Parameter]:
    """One `hatrack train` option per TrainConfig field, with the field's default and
    help text, then --json: the dataclass is the one source of both."""
    from hatrack.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli") is False:
            continue
        annotation, default = hints[f.name], f.default
        if f.name == "tags":  # k=v words on the command line, a dict in the config
            annotation, default = Optional[List[str]], None
        elif default is dataclasses.MISSING:
            default = ...  # required
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        option = typer.Option(default, flag, help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    json_option = typer.Option(False, "--json", help="Print the outcome as JSON.")
    params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=json_option, annotation=bool))
    processes_option = typer.Option(
        1, "--processes", min=1,
        help="Train in N processes (data-parallel, one per GPU; on CPU they share the cores), as "
             "`accelerate launch --multi_gpu --num_processes N -m hatrack.cli.main train ...` does. "
             "Rows per step (--batch-size) stay those of the whole run.")
    params.append(inspect.Parameter("processes", inspect.Parameter.KEYWORD_ONLY, default=processes_option,
                                    annotation=int))
    return params


def train(*, as_json: bool = False, processes: int = 1, **options: Any) -> None:
    """Train a LoRA adapter on a dataset, evaluate it against its base, register it.

    Also runs under `accelerate launch` (DDP): the rows are sharded among the processes
    and the main process registers the one version."""
    from hatrack.registry import Registry
    from hatrack.trainer import TrainConfig
    from hatrack.trainer import train as run_training

    config = TrainConfig(**{**options, "tags": _tags(options.get("tags"))})
    if processes > 1:
        from hatrack.trainer import api, distributed, launch

        if distributed.current().distributed:
            raise HatrackError("--processes: this run was already launched in several processes")
        api.precheck(config, processes)  # a bad option or row is reported once, before any launch
        raise typer.Exit(launch.run(config, processes, as_json))
    outcome = run_training(config, Registry(), progress=True)
    if outcome is None:
        return  # another process of a distributed run: the main one reports
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
        None, "--quantize", help="Load the base as nf4 | int8 | int8wo | none (default: as the version was trained)."),
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
    params = _train_parameters()
    train.__signature__ = inspect.Signature(params)  # what typer reads to build the options
    train.__annotations__ = {p.name: p.annotation for p in params}
    app.command("train")(train)
    app.command("eval")(eval_cmd)
