"""`hatrack train --processes 2` on the tiny model: DDP on CPU (gloo), launched through
accelerate's launcher by the real console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_registry
from hatrack.trainer import TrainConfig, train

HATRACK = str(Path(sys.executable).with_name("hatrack"))


def _loss_tolerance() -> float:
    """How far the processes' reduced losses may sit from one process's: summation order
    only (1 thread a process against 2 in one). In fp32 that is below 1e-4; where training
    computes in bf16 (CPUs with AVX-512 BF16 or AMX) more (measured: 1.7e-4 at most; 2e-3
    allowed). Either way far below the ~0.05 by which one rank's rows alone would differ."""
    import torch

    from hatrack import basemodel

    return 1e-4 if basemodel.compute_dtype("cpu") == torch.float32 else 2e-3


@pytest.fixture()
def registry(hatrack_home, tiny_base_dir):
    return tiny_registry(tiny_base_dir)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_args(data: Path, *extra: str) -> list[str]:
    return [HATRACK, "train", "--data", str(data), "--name", "codes", "--base", "tiny", "--lr", "1e-3",
            "--eval-split", "0.15", "--batch-size", "4", "--processes", "2", *extra]


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the training process of `rank` under `launcher_pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(launcher_pid, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


def test_two_processes_survive_a_kill_by_resuming_and_register_the_whole_runs_version(registry, codes, hatrack_home):
    # 20 training rows, 4 per step split 2 + 2 between the processes: 5 steps an epoch
    args = _train_args(codes, "--epochs", "2", "--save-steps", "2")
    run = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not list((hatrack_home / "runs").glob("codes-*/checkpoint-2/hatrack-rows.json")):
            assert run.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        worker = _worker_pid(run.pid, rank=1)
        assert worker is not None, "no process of rank 1 found"
        os.kill(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        run.communicate(timeout=120)  # the others must not wait for it forever
        stopped_after = time.monotonic() - killed_at
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0 and stopped_after < 60
    assert registry.list_versions(name="codes") == []
    assert not list((hatrack_home / "store").rglob("adapter_model.safetensors"))  # nothing half-stored

    resumed = subprocess.run(_train_args(codes, "--resume", "--json"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout)
    assert [v["version"] for v in registry.list_versions(name="codes")] == [1] and out["version"] == 1
    m = registry.get_version("codes", 1).train_metrics
    assert m["resumed"] is True and m["processes"] == 2 and m["train_rows"] == 20 and m["steps"] == 10
    # each row once an epoch, over both processes and both sessions
    assert m["rows_seen"] == 40 and m["distinct_rows_seen"] == 20
    curve = m["loss_curve"]
    assert [step for step, _ in curve] == list(range(1, 11))
    # progress and the outcome come from the main process only
    assert resumed.stderr.count("resuming from step") == 1
    assert resumed.stderr.count("evaluating adapter and base on 4 held-out rows") == 1

    # the same run in one process trains on the same 4-row batches: the curve and the
    # held-out scores agree with the processes' reduced ones (rank 0's rows alone would not)
    alone = train(TrainConfig(data=str(codes), name="codes", base="tiny", lr=1e-3, eval_split=0.15, batch_size=4,
                              epochs=2), registry, progress=False)
    assert [s for s, _ in alone.metrics["loss_curve"]] == list(range(1, 11))
    tol = _loss_tolerance()
    for (_, two), (_, one) in zip(curve, alone.metrics["loss_curve"]):
        assert two == pytest.approx(one, abs=tol)  # per-row losses differ by ~0.05
    scores, single = {s["metric"]: s for s in out["scores"]}, {s.metric: s for s in alone.scores}
    assert scores["eval_loss"]["value"] == pytest.approx(single["eval_loss"].value, abs=tol)
    assert scores["eval_loss"]["base_value"] == pytest.approx(single["eval_loss"].base_value, abs=tol)
    assert alone.version == 2  # the two processes registered one version between them


def test_a_batch_size_the_processes_cannot_split_is_refused_before_launching(hatrack_home, codes):
    proc = subprocess.run([HATRACK, "train", "--data", str(codes), "--name", "codes", "--processes", "2",
                           "--batch-size", "3"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("error: --batch-size 3 cannot be split evenly among 2 processes (it is rows per step "
                           "of the whole run); pass a multiple of 2\n")
    assert list(hatrack_home.glob("runs/*")) == []


def test_a_process_of_a_launched_run_keeps_its_output_and_exit_code(registry, codes):
    # such a process leaves without the interpreter's teardown (os._exit): what it printed
    # to a pipe must still arrive whole, and its exit code be its command's
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    train(TrainConfig(data=str(codes), name="codes", base="tiny", max_steps=1, eval_split=0), registry, progress=False)
    listed = subprocess.run([HATRACK, "list", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [v["version"] for v in json.loads(listed.stdout)] == [1]
    missing = subprocess.run([HATRACK, "show", "codes@9"], env=env, capture_output=True, text=True, timeout=120)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "error: (process 1) 'codes' has no version 9\n"
