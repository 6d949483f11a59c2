"""`hatrack train` and `hatrack eval` through the real console script: options checked
before anything heavy, resume hints, quiet library warnings, the --help listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HATRACK = str(Path(sys.executable).with_name("hatrack"))


def _run(home: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([HATRACK, *args], env={**base, "HATRACK_HOME": str(home), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "codes.jsonl"
    data = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} is {i * 7}."}]} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.fixture()
def no_torch(tmp_path: Path) -> dict:
    """An environment in which importing torch fails loudly: a command that gets as far
    as torch shows it in its error."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("args, message", [
    (("--eval-split", "1.5"), "error: --eval-split must be in [0, 1); got 1.5"),
    (("--quantize", "fp8"), "error: --quantize must be one of nf4, int8, int8wo, none; got 'fp8'"),
    (("--rank", "0"), "error: --rank must be at least 1; got 0"),
    (("--dtype", "half"), "error: --dtype must be one of auto, float32, bfloat16; got 'half'"),
    (("--quantize", "int8wo"), "error: --quantize int8wo serves and evaluates only (its int8 kernel has no "
                               "backward); train with --quantize nf4, int8 or none (or leave it out)"),
])
def test_bad_train_option_fails_fast_and_leaves_no_run_folder(hatrack_home, rows, no_torch, args, message):
    started = time.monotonic()
    proc = _run(hatrack_home, "train", "--data", str(rows), "--name", "codes", *args, env=no_torch)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == message + "\n"  # before torch: the fake one above was never imported
    assert time.monotonic() - started < 30
    assert list(hatrack_home.glob("runs/*")) == []


# Runs the real CLI, pressing Ctrl-C (SIGINT to itself) when the step given by
# CTRL_C_AT has ended: a point a timer cannot hit on a run this short.
CTRL_C_DRIVER = """
import os, signal, sys
import hatrack.trainer.loop as loop
real_callbacks = loop._callbacks

def _callbacks(total, progress, stop_flag):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(os.environ["CTRL_C_AT"]):
                os.kill(os.getpid(), signal.SIGINT)

        def close(self):
            pass

    return [CtrlC(), *real_callbacks(total, progress, stop_flag)]

loop._callbacks = _callbacks
from hatrack.cli.main import main
sys.argv[0] = "hatrack"
main()
"""

LIBRARY_NOISE = ("FutureWarning", "DeprecationWarning", "kernels-community", "is_gradient_checkpointing")


def test_ctrl_c_says_how_to_resume_and_resume_says_where_it_starts(hatrack_home, tiny_base_dir, rows):
    from conftest import tiny_registry

    tiny_registry(tiny_base_dir)
    args = ["train", "--data", str(rows), "--name", "codes", "--base", "tiny", "--max-steps", "6",
            "--batch-size", "2", "--max-length", "64", "--quantize", "none"]  # no --save-steps
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    stopped = subprocess.run([sys.executable, "-c", CTRL_C_DRIVER, *args], capture_output=True, text=True,
                             env={**base, "HATRACK_HOME": str(hatrack_home), "CTRL_C_AT": "3"}, timeout=300)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    [run_dir] = hatrack_home.glob("runs/codes-*")
    assert stopped.stderr.splitlines()[-1] == (
        f"error: interrupted at step 3 of 6; checkpoint saved in {run_dir}/checkpoint-3; "
        f"to carry on, run: hatrack train --data {rows} --name codes --resume")
    assert not any(noise in stopped.stderr for noise in LIBRARY_NOISE), stopped.stderr

    resumed = _run(hatrack_home, "train", "--data", str(rows), "--name", "codes", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.startswith("codes.jsonl: 24 rows")
    assert f"\nresuming from step 3 of 6 (checkpoint {run_dir}/checkpoint-3)\n" in resumed.stderr
    assert resumed.stdout.startswith("registered codes@1") and "trained 6 steps" in resumed.stdout
    assert not any(noise in resumed.stderr for noise in LIBRARY_NOISE), resumed.stderr

    scored = _run(hatrack_home, "eval", "codes@1", "--data", str(rows), "--quantize", "none")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert scored.stdout.startswith("scores added to codes@1 (split eval:codes.jsonl):\n")
    assert not any(noise in scored.stderr for noise in LIBRARY_NOISE), scored.stderr

    # a weight-only int8 base evaluates too (no backward needed), and says its precision
    wo = _run(hatrack_home, "eval", "codes@1", "--data", str(rows), "--quantize", "int8wo")
    assert wo.returncode == 0, wo.stderr[-2000:]
    assert " at int8wo ..." in wo.stderr

    def eval_loss(stdout: str) -> float:
        return next(float(line.split()[1]) for line in stdout.splitlines() if line.split()[:1] == ["eval_loss"])

    assert abs(eval_loss(wo.stdout) - eval_loss(scored.stdout)) < 0.05 * eval_loss(scored.stdout)


def test_quiet_drops_library_notices_and_keeps_hatracks_own():
    script = (
        "import logging, warnings\n"
        "from hatrack.cli import quiet\n"
        "quiet.install()\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: no kernels')\n"
        "warnings.warn_explicit('`is_gradient_checkpointing` is deprecated', FutureWarning, "
        "'modeling_utils.py', 3312, module='transformers.modeling_utils')\n"
        "warnings.warn_explicit('the adapter was scored at another precision', UserWarning, "
        "'catalog.py', 1, module='hatrack.server.catalog')\n"
        "logging.getLogger('bitsandbytes').error('CUDA driver missing')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr
    assert "UserWarning: the adapter was scored at another precision" in proc.stderr
    assert "CUDA driver missing" in proc.stderr


def test_eval_passes_quantize_through(monkeypatch):
    from typer.testing import CliRunner

    import hatrack.trainer
    from hatrack.cli.main import app
    from hatrack.registry import ScoreIn

    seen = {}

    def fake_evaluate(registry, ref, data, *, quantize=None, progress=True):
        seen.update(ref=ref, data=data, quantize=quantize)
        return [ScoreIn("eval_loss", 1.5, 2.0, split="eval:x.jsonl")]

    monkeypatch.setattr(hatrack.trainer, "evaluate", fake_evaluate)
    result = CliRunner().invoke(app, ["eval", "codes@1", "--data", "x.jsonl", "--quantize", "nf4"])
    assert result.exit_code == 0, result.output
    assert seen == {"ref": "codes@1", "data": "x.jsonl", "quantize": "nf4"}
    result = CliRunner().invoke(app, ["eval", "codes@1", "--data", "x.jsonl"])
    assert seen["quantize"] is None  # as the version was trained


def test_eval_refuses_an_unknown_quantize_at_once(hatrack_home, rows, no_torch):
    proc = _run(hatrack_home, "eval", "codes@1", "--data", str(rows), "--quantize", "fp8", env=no_torch)
    assert proc.returncode == 1 and proc.stderr == "error: --quantize must be one of nf4, int8, int8wo, none; got 'fp8'\n"


def test_train_options_come_from_train_config(monkeypatch):
    import dataclasses

    from typer.testing import CliRunner

    import hatrack.trainer
    from hatrack import settings
    from hatrack.cli.main import app
    from hatrack.trainer import TrainConfig

    shown = subprocess.run([HATRACK, "train", "--help"], env={**os.environ, "COLUMNS": "200"},
                           capture_output=True, text=True, timeout=60).stdout
    for f in dataclasses.fields(TrainConfig):
        if f.name == "run_id":
            assert "--run-id" not in shown  # set by a run, not by its user
            continue
        flag = "--tag" if f.name == "tags" else "--" + f.name.replace("_", "-")
        [line] = [line for line in shown.splitlines() if f" {flag} " in line]
        assert f.metadata["help"] in line
        if f.default not in (None, False, dataclasses.MISSING):
            assert f"[default: {f.default}]" in line
    assert f"[default: {settings.DEFAULT_BASE_NAME}]" in shown and "--json" in shown

    seen = []
    monkeypatch.setattr(hatrack.trainer, "train", lambda config, registry, progress: seen.append(config) or 1 / 0)
    result = CliRunner().invoke(app, ["train", "--data", "x.jsonl", "--name", "acme", "--tag", "customer=acme",
                                      "--rank", "8", "--eval-split", "0", "--quantize", "none"])
    assert isinstance(result.exception, ZeroDivisionError)  # stopped right after building the config
    assert seen == [TrainConfig(data="x.jsonl", name="acme", tags={"customer": "acme"}, rank=8, eval_split=0.0,
                                quantize="none")]
