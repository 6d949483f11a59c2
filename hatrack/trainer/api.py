"""train() and evaluate(): a dataset in, a registered, scored adapter version out.

Nothing is registered until training and evaluation have both finished, so a run
that fails or is killed leaves no version behind; its checkpoints stay in
HATRACK_HOME/runs/<name>-<data sha256[:12]>/ for --resume.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatrack import adapter_format, basemodel, settings
from hatrack.errors import HatrackError
from hatrack.registry import DatasetInfo, Registry, ScoreIn, parse_ref, validate_name
from hatrack.trainer import data as data_mod
from hatrack.chat_format import load_generation_config
from hatrack.trainer.render import check_mask, encode, end_of_turn_ids
from hatrack.precision import DTYPE_CHOICES
from hatrack.trainer.runtime import check_quantize

RUN_CONFIG = "hatrack-run.json"
METRICS = ("eval_loss", "perplexity", "exact_match", "contains")


def _opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A TrainConfig field with its `hatrack train` help text (the CLI is built from
    these fields: one place for each default and its help)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    data: str = _opt(help="JSONL, JSON, CSV or Parquet file, or a Hugging Face dataset name.")
    name: str = _opt(help="Adapter name; each run adds a version.")
    base: str = _opt(settings.DEFAULT_BASE_NAME, "Registered base model.")
    tags: dict[str, str] = field(default_factory=dict, metadata={
        "help": "k=v tag for the new version (repeatable).", "flag": "--tag"})
    eval_split: float = _opt(0.1, "Share of rows held out for evaluation (0 = none).")
    epochs: float = _opt(3.0, "Passes over the training rows.")
    max_steps: int | None = _opt(None, "Stop after this many steps (overrides --epochs).")
    rank: int = _opt(16, "LoRA rank.")
    alpha: int = _opt(32, "LoRA alpha.")
    lr: float = _opt(2e-4, "Learning rate.")
    targets: str = _opt("all-linear", "all-linear, or comma-separated module names.")
    quantize: str | None = _opt(None, "nf4 | int8 | none (default: best for this machine).")
    dtype: str = _opt("auto", "Compute dtype: auto | float32 | bfloat16 (auto: bf16 where the device is fast at it).")
    seed: int = _opt(42, "Seed for the split, LoRA init and data order.")
    resume: bool = _opt(False, "Continue the interrupted run of this name and data.")
    save_steps: int | None = _opt(None, "Write a checkpoint every N steps.")
    # small per-customer sets learn more from more, smaller steps
    batch_size: int = _opt(4, "Rows per step.")
    max_length: int = _opt(1024, "Tokens per row; longer rows are cut.")
    parent: str | None = _opt(None, "NAME@V: continue training from that version.")
    # set when a run starts; lets --resume see the run was already registered
    run_id: str | None = _opt(None, cli=False)


@dataclass
class TrainOutcome:
    version: int
    name: str
    sha256: str
    scores: list[ScoreIn]
    metrics: dict
    artifact_dir: Path


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def lib_versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def run_dir_for(name: str, data_sha256: str) -> Path:
    return settings.home() / "runs" / f"{name}-{data_sha256[:12]}"


def _check_config(config: TrainConfig) -> None:
    """Every option, checked before the dataset is read, a run folder made or torch imported."""
    validate_name(config.name)
    checks = [
        (config.rank >= 1, f"--rank must be at least 1; got {config.rank}"),
        (config.alpha >= 1, f"--alpha must be at least 1; got {config.alpha}"),
        (config.lr > 0, f"--lr must be positive; got {config.lr}"),
        (config.epochs > 0, f"--epochs must be positive; got {config.epochs}"),
        (config.max_steps is None or config.max_steps >= 1, f"--max-steps must be at least 1; got {config.max_steps}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1; got {config.batch_size}"),
        (config.max_length >= 16, f"--max-length must be at least 16; got {config.max_length}"),
        (config.save_steps is None or config.save_steps >= 1, f"--save-steps must be at least 1; got {config.save_steps}"),
        (0 <= config.eval_split < 1, f"--eval-split must be in [0, 1); got {config.eval_split}"),
    ]
    for ok, message in checks:
        if not ok:
            raise HatrackError(message)
    if config.quantize is not None:
        check_quantize(config.quantize, training=True)
    if config.dtype not in DTYPE_CHOICES:
        raise HatrackError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {config.dtype!r}")
    adapter_format.check_rank(config.rank, field_name="--rank")  # refused here, not after training


def _prepare_run_dir(config: TrainConfig, dataset_sha: str) -> tuple[TrainConfig, Path, Path | None]:
    """(config to train with, run folder, checkpoint to resume from). --resume takes the
    interrupted run's own config, so the same command line without flags carries on."""
    from hatrack.trainer.loop import last_checkpoint

    run_dir = run_dir_for(config.name, dataset_sha)
    if config.resume:
        checkpoint = last_checkpoint(run_dir) if run_dir.is_dir() else None
        saved = run_dir / RUN_CONFIG
        if checkpoint is None or not saved.is_file():
            where = f"no checkpoint in {run_dir}" if run_dir.is_dir() else "no interrupted run of it"
            raise HatrackError(
                f"nothing to resume for {config.name} on this data: {where} (a run writes one when Ctrl-C "
                "stops it, or every N steps with --save-steps N); run the command again without --resume"
            )
        fields = json.loads(saved.read_text())
        fields["resume"] = True
        return TrainConfig(**fields), run_dir, checkpoint
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run replaces an abandoned one
    run_dir.mkdir(parents=True)
    config = dataclasses.replace(config, run_id=uuid.uuid4().hex[:16])
    (run_dir / RUN_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return config, run_dir, None


def resume_command(config: TrainConfig) -> str:
    """The command line that carries on this run: --resume takes every other option
    from the run's own saved config."""
    import shlex

    return shlex.join(["hatrack", "train", "--data", config.data, "--name", config.name, "--resume"])


def _refuse_registered_run(registry: Registry, config: TrainConfig, run_dir: Path) -> None:
    """A run killed after its version was registered but before its folder was removed
    must not register a second version on --resume."""
    if not config.run_id:
        return
    for row in registry.list_versions(name=config.name):
        info = registry.version_info(config.name, row["version"])
        if (info.get("train_config") or {}).get("run_id") == config.run_id:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise HatrackError(
                f"this run was already registered as {info['label']} before it was interrupted; "
                "nothing to resume"
            )


def check_processes(config: TrainConfig, processes: int) -> None:
    """--batch-size is rows per step of the whole run, split evenly among its processes."""
    if processes > 1 and config.batch_size % processes:
        raise HatrackError(
            f"--batch-size {config.batch_size} cannot be split evenly among {processes} processes "
            f"(it is rows per step of the whole run); pass a multiple of {processes}"
        )


def precheck(config: TrainConfig, processes: int = 1) -> data_mod.Dataset:
    """Every option and every row checked, torch-free (before processes are launched)."""
    _check_config(config)
    if not config.resume:  # a resumed run is held to its own --batch-size, checked then
        check_processes(config, processes)
    return data_mod.load_dataset(config.data)  # every bad row is reported before anything else


def _prepare_main(registry: Registry, config: TrainConfig, dataset_sha: str,
                  processes: int) -> tuple[TrainConfig, Path, Path | None]:
    config, run_dir, checkpoint = _prepare_run_dir(config, dataset_sha)
    if config.resume:
        _refuse_registered_run(registry, config, run_dir)
        check_processes(config, processes)  # the resumed run's own --batch-size
    return config, run_dir, checkpoint


def train(config: TrainConfig, registry: Registry, *, progress: bool = True) -> TrainOutcome | None:
    """Train a LoRA adapter on config.data, evaluate it and its base on held-out rows,
    and register it as the next version of config.name.

    Under `accelerate launch` (several processes) every process calls this: they train
    on shards of the rows and score shares of the held-out rows, and the main process
    alone registers the one version; the others return None."""
    from hatrack.trainer import distributed

    procs = distributed.current()
    if procs.distributed:
        procs = distributed.start(basemodel.best_device())
    clean = False
    try:
        # checked by the main process first, so a bad option or row is reported once
        dataset = procs.main_first(lambda: precheck(config, procs.world))
        # the main process prepares the run folder (a fresh run id, or the checkpoint
        # to resume from); every process trains with what it decided
        config, run_dir, checkpoint = procs.from_main(lambda: _prepare_main(registry, config, dataset.sha256, procs.world))
        outcome = _train(config, registry, dataset, run_dir, checkpoint, procs, progress and procs.is_main)
        clean = True
        return outcome
    except RuntimeError as err:
        lost = distributed.lost_peer(err) if procs.distributed else None
        if lost is None:
            raise
        raise HatrackError(f"another process of this run is gone ({lost}); nothing was registered") from None
    finally:
        procs.finish(clean)


def _train(config: TrainConfig, registry: Registry, dataset: data_mod.Dataset, run_dir: Path,
           checkpoint: Path | None, procs, progress: bool) -> TrainOutcome | None:
    parent_version, parent_dir = None, None
    base_name = config.base
    if config.parent:
        ref = parse_ref(config.parent)
        if ref.name != config.name:
            raise HatrackError(f"--parent {config.parent}: must be a version of {config.name}")
        parent = registry.version_of(config.parent)
        parent_version, base_name = parent.version, parent.base_name
        parent_dir = registry.open_artifact(parent.sha256)
    base = procs.main_first(lambda: basemodel.ensure_base(registry, base_name))  # converted once

    from transformers import AutoTokenizer, set_seed

    from hatrack.trainer import evaluation, loop, runtime as rt

    runtime = rt.choose_runtime(config.quantize, config.dtype)
    if procs.distributed and runtime.device == "cuda":
        runtime = dataclasses.replace(runtime, device=f"cuda:{procs.local_rank}")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eot_ids = end_of_turn_ids(tokenizer, load_generation_config(base.path))
    eot_name = tokenizer.convert_ids_to_tokens(sorted(eot_ids)[0]) if eot_ids else "(none)"

    train_rows, heldout = data_mod.split(dataset.examples, config.eval_split, config.seed)
    encoded = [encode(tokenizer, e, eot_ids, config.max_length) for e in train_rows]
    health = check_mask(encoded, eot_ids, dataset.label, config.max_length, eot_name)
    encoded = [e for e in encoded if e.trained]
    _say(progress, f"{dataset.label}: {dataset.rows} rows ({len(encoded)} train, {len(heldout)} held out), "
                   f"{health.trained_share:.0%} of tokens trained; base {base.name}, "
                   f"{runtime.device} {str(runtime.dtype).replace('torch.', '')}, quantize {runtime.quantize}"
                   + (f", {procs.world} processes" if procs.distributed else ""))

    set_seed(config.seed)  # LoRA init and data order
    model, tokenizer = rt.load_trainable(
        Path(base.path), runtime, rt.LoraSpec(config.rank, config.alpha, config.targets), parent_dir
    )
    settings_ = loop.LoopSettings(
        epochs=config.epochs, max_steps=config.max_steps, lr=config.lr, batch_size=config.batch_size,
        max_length=config.max_length, seed=config.seed, save_steps=config.save_steps,
    )
    result = loop.run(model, tokenizer, encoded, runtime, settings_, run_dir, resume_from=checkpoint,
                      progress=progress, resume_command=resume_command(config), processes=procs)

    scores: list[ScoreIn] = []
    samples: dict = {}
    if heldout:  # each process scores its share; all get the scores of every row
        _say(progress, f"evaluating adapter and base on {len(heldout)} held-out rows ...")
        mine, theirs, samples = evaluation.score_both(
            model, tokenizer, heldout, eot_ids, config.max_length, on_stage=None, processes=procs
        )
        scores = to_scores(mine, theirs, dataset.sha256, "heldout", runtime.precision)
    if not procs.is_main:
        return None  # every process has finished training and scoring; the main one registers

    adapter_dir = run_dir / "adapter"  # the weights are the same in every process (DDP)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    for extra in adapter_dir.iterdir():  # the store takes exactly config + safetensors
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)

    metrics: dict[str, Any] = {
        "final_loss": result.final_loss,
        "steps": result.steps,
        "runtime_s": round(result.runtime_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "loss_curve": result.loss_curve,
        "trained_token_share": health.as_dict()["trained_token_share"],
        "label_mask": health.as_dict(),
        "train_rows": len(encoded),
        "rows_seen": result.rows_seen,
        "distinct_rows_seen": result.distinct_rows_seen,
        "processes": procs.world,
        "heldout_rows": len(heldout),
        "device": runtime.device.split(":")[0],
        "compute_dtype": str(runtime.dtype).replace("torch.", ""),
        "resumed": config.resume,
    }
    if samples:
        metrics["heldout_samples"] = samples
    train_config = dataclasses.asdict(config) | {"quantize": runtime.quantize, "base": base.name}
    record = registry.register(
        adapter_dir,
        name=config.name,
        base=base.name,
        tags=config.tags,
        parent_version=parent_version,
        quantization=runtime.quantize,
        dataset=DatasetInfo(sha256=dataset.sha256, rows=dataset.rows, source=dataset.source),
        train_config=train_config,
        seed=config.seed,
        train_metrics=metrics,
        chat_template_sha256=basemodel.chat_template_sha256(Path(base.path)),
        lib_versions=lib_versions(),
        scores=scores,
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # registered: checkpoints are no longer needed
    return TrainOutcome(
        version=record.version,
        name=record.name,
        sha256=record.sha256,
        scores=scores,
        metrics=metrics,
        artifact_dir=registry.open_artifact(record.sha256, verify=False),
    )


def to_scores(mine, theirs, dataset_sha: str, split: str, precision: str | None = None) -> list[ScoreIn]:
    """Scores of the adapter beside its base's, each recording the base precision
    (`bf16`, `fp32`, `nf4`, `int8`) both were measured at."""
    out = []
    for metric in METRICS:
        value = getattr(mine, metric)
        if value is None:
            continue
        rows = mine.answer_rows if metric in ("exact_match", "contains") else mine.loss_rows
        out.append(ScoreIn(metric=metric, value=float(value), base_value=float(getattr(theirs, metric)),
                           dataset_sha256=dataset_sha, split=split, rows=rows, precision=precision))
    return out


def evaluate(registry: Registry, ref: str, data: str, *, quantize: str | None = None,
             progress: bool = True) -> list[ScoreIn]:
    """Score version `ref` (NAME or NAME@V) and its base on `data`; add the scores to
    that version with split "eval:<file name>". `quantize` scores both at a serving
    precision (nf4, int8, int8wo, none); by default at the precision the version was trained at."""
    if quantize is not None:
        check_quantize(quantize)
    record = registry.version_of(ref)
    dataset = data_mod.load_dataset(data)
    base = registry.get_base(record.base_name)
    if base.fingerprint != record.base_fingerprint:
        raise HatrackError(f"{record.label} was trained on another {base.name} (fingerprint differs); not scoring it")
    adapter_dir = registry.open_artifact(record.sha256)

    from hatrack.trainer import evaluation, runtime as rt

    trained_at = record.quantization if record.quantization in rt.QUANTIZE_CHOICES else None
    runtime = rt.choose_runtime(quantize or trained_at)
    _say(progress, f"scoring {record.label} and {base.name} on {dataset.label} ({dataset.rows} rows) "
                   f"at {runtime.precision} ...")
    model, tokenizer = rt.load_for_eval(Path(base.path), runtime, adapter_dir)
    eot_ids = end_of_turn_ids(tokenizer, load_generation_config(base.path))
    max_length = int((record.train_config or {}).get("max_length") or 1024)
    mine, theirs, _ = evaluation.score_both(model, tokenizer, dataset.examples, eot_ids, max_length)
    scores = to_scores(mine, theirs, dataset.sha256, f"eval:{dataset.label}", runtime.precision)
    registry.add_scores(record.name, record.version, scores)
    return scores
