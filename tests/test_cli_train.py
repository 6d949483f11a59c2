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
    (("--quantize", "fp8"), "error: --quantize must be one of nf4, int8, none; got 'fp8'"),
    (("--rank", "0"), "error: --rank must be at least 1; got 0"),
])
def test_bad_train_option_fails_fast_and_leaves_no_run_folder(hatrack_home, rows, no_torch, args, message):
    started = time.monotonic()
    proc = _run(hatrack_home, "train", "--data", str(rows), "--name", "codes", *args, env=no_torch)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == message + "\n"  # before torch: the fake one above was never imported
    assert time.monotonic() - started < 30
    assert list(hatrack_home.glob("runs/*")) == []
