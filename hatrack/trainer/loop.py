"""The training run itself: TRL's SFTTrainer over pre-tokenised rows.

Rows arrive already tokenised with their label mask (render.py), so SFTTrainer
neither re-renders nor re-masks them. Batches are padded, not padding-free: on CPU
the packed-sequence attention mask (sdpa) made steps ~5x slower than the padding
it saves. Checkpoints go to the run folder; Ctrl-C asks the trainer to
save and stop at the end of the current step.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatrack.errors import HatrackError, describe_os_error
from hatrack.trainer.distributed import Processes, timeout_s
from hatrack.trainer.render import Encoded
from hatrack.trainer.runtime import Runtime


class TrainingInterrupted(HatrackError):
    """Ctrl-C during training: the last checkpoint is kept for --resume."""


@dataclass
class LoopSettings:
    epochs: float
    max_steps: int | None
    lr: float
    batch_size: int
    max_length: int
    seed: int
    save_steps: int | None
    padding_free: bool = False
    warmup_ratio: float = 0.05


@dataclass
class LoopResult:
    steps: int
    final_loss: float
    runtime_s: float
    tokens: int  # input tokens processed (no padding), by all processes
    loss_curve: list[list[float]] = field(default_factory=list)  # each step's loss over all processes
    rows_seen: int = 0  # training rows in the run's batches, all processes (and resumed-from sessions) together
    distinct_rows_seen: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.runtime_s if self.runtime_s > 0 else 0.0


def planned_steps(rows: int, settings: LoopSettings) -> int:
    if settings.max_steps:
        return settings.max_steps
    return max(1, math.ceil(math.ceil(rows / settings.batch_size) * settings.epochs))


def last_checkpoint(run_dir: Path) -> Path | None:
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in found if _state_is_whole(p / "trainer_state.json")]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _state_is_whole(path: Path) -> bool:
    """The trainer writes trainer_state.json last, unatomically: a kill mid-save leaves
    no state file, or half of one, which must not be resumed from."""
    import json

    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def _callbacks(total: int, progress: bool, stop_flag: dict):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A bar with the latest loss, and the step/token counters."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if stop_flag.get("stop"):
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kw):
            self.close()

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return [Progress()]


def run(
    model,
    tokenizer,
    train_rows: list[Encoded],
    runtime: Runtime,
    settings: LoopSettings,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    progress: bool = True,
    resume_command: str = "the same command with --resume",
    processes: Processes | None = None,
) -> LoopResult:
    """Train `model` (a PEFT model) in place; return what the run measured.
    `resume_command` is what an interrupted run tells the user to run. With several
    processes, `settings.batch_size` rows per step are split among them and each
    epoch's rows are sharded (accelerate's sampler), each row going to one process."""
    import warnings

    import datasets
    from trl import SFTConfig, SFTTrainer

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")

    procs = processes or Processes()
    total = planned_steps(len(train_rows), settings)
    dataset = datasets.Dataset.from_dict({
        "input_ids": [r.input_ids for r in train_rows],
        "labels": [r.labels for r in train_rows],
        "row": list(range(len(train_rows))),  # taken out again by _RowCounter
    })
    config = SFTConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=settings.batch_size // procs.world,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(0, round(total * settings.warmup_ratio)),
        seed=settings.seed,
        data_seed=settings.seed,
        # rows arrive truncated to max_length already (render.encode)
        max_length=None if settings.padding_free else settings.max_length,
        padding_free=settings.padding_free,
        shuffle_dataset=False,  # the trainer's seeded sampler shuffles every epoch
        gradient_checkpointing=False,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        use_cpu=runtime.device == "cpu",
        logging_steps=max(1, total // 200),
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_num_proc=None,
        optim="adamw_torch",
        ddp_timeout=timeout_s(),
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward
        # padding-free batches hold no padding; padded ones are counted by their attention mask
        include_num_input_tokens_seen="all" if settings.padding_free else "non_padding",
    )
    stop_flag: dict[str, Any] = {}
    callbacks = _callbacks(total, progress, stop_flag)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no dict per step on stdout
    start_step = 0
    start_tokens = 0
    if resume_from is not None:
        import json

        saved = json.loads((resume_from / "trainer_state.json").read_text())
        start_tokens = int(saved.get("num_input_tokens_seen", 0))
        start_step = int(saved.get("global_step", 0))
        if progress:
            print(f"resuming from step {int(saved.get('global_step', 0))} of {total} (checkpoint {resume_from})",
                  file=sys.stderr, flush=True)

    def _on_sigint(signum, frame):
        if stop_flag.get("stop"):  # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        stop_flag["stop"] = True

    counter = _RowCounter(trainer.data_collator, procs, _rows_before(resume_from), start_step)
    trainer.data_collator = counter
    trainer.add_callback(counter.saver())
    # several processes: the launcher stops them all on Ctrl-C (at once, so no
    # checkpoint then); the --save-steps checkpoints are what --resume carries on from
    previous = signal.signal(signal.SIGINT, _on_sigint) if _main_thread() and not procs.distributed else None
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as err:  # a checkpoint that cannot be written: say where, in one line
        raise HatrackError(f"training stopped writing under {run_dir}: {describe_os_error(err)}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for callback in callbacks:  # close the bar before any error line is printed
            callback.close()
    runtime_s = time.perf_counter() - started
    state = trainer.state
    if stop_flag.get("stop"):  # Ctrl-C: the trainer saved a checkpoint at this step before stopping
        checkpoint = last_checkpoint(run_dir)
        kept = f"checkpoint saved in {checkpoint}" if checkpoint else f"run folder {run_dir} kept"
        raise TrainingInterrupted(
            f"interrupted at step {state.global_step} of {total}; {kept}; to carry on, run: {resume_command}"
        )
    curve = [[int(e["step"]), float(e["loss"])] for e in state.log_history if "loss" in e and "step" in e]
    tokens = int(state.num_input_tokens_seen) - start_tokens  # counted over all processes
    seen = counter.all_rows(state.global_step)
    trainer.accelerator.free_memory()
    return LoopResult(
        steps=state.global_step,
        final_loss=curve[-1][1] if curve else float("nan"),
        runtime_s=runtime_s,
        tokens=tokens,
        loss_curve=curve,
        rows_seen=len(seen),
        distinct_rows_seen=len(set(seen)),
    )


ROWS_FILE = "hatrack-rows.json"


def _rows_before(checkpoint: Path | None) -> list[int]:
    """The rows the run had trained on up to `checkpoint` (written there by _RowCounter)."""
    import json

    if checkpoint is None or not (checkpoint / ROWS_FILE).is_file():
        return []
    return [int(r) for r in json.loads((checkpoint / ROWS_FILE).read_text())]


class _RowCounter:
    """The trainer's collator, noting which rows this process was given (each epoch's
    rows are sharded among the processes, so together they see each once). Every
    checkpoint records the rows of all processes so far, so a resumed run counts the
    whole run's."""

    def __init__(self, collate, procs: Processes, before: list[int], start_step: int) -> None:
        self.collate = collate
        self.procs = procs
        self.before = before
        self.start_step = start_step
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict]):
        features = [dict(f) for f in features]
        self.batches.append([int(f.pop("row")) for f in features])
        return self.collate(features)

    def all_rows(self, global_step: int) -> list[int]:
        """Every process's rows up to `global_step` (all processes call this together).
        One batch a step; the data loader collates one batch ahead, which is not counted."""
        mine = [row for batch in self.batches[: global_step - self.start_step] for row in batch]
        return self.before + [row for rows in self.procs.gather(mine) for row in rows]

    def saver(self):
        from transformers import TrainerCallback

        counter = self

        class SaveRows(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                import json

                rows = counter.all_rows(state.global_step)
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if counter.procs.is_main and folder.is_dir():
                    (folder / ROWS_FILE).write_text(json.dumps(rows))

        return SaveRows()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
