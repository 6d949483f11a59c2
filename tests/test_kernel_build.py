"""Building the CPU kernel never waits forever on a build that died, and one machine builds
it once whichever checkout asks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hatrack.server.engine import cpu_kernel


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path: Path) -> None:
    (tmp_path / "lock").write_text("")  # what torch's builder leaves when killed mid-compile
    with cpu_kernel._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_running_build_is_waited_for_and_its_lock_kept(tmp_path: Path) -> None:
    (tmp_path / "lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(tmp_path / '.hatrack-build.lock')!r}, 'w')\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(1.5)\n"
        f"import os; os.unlink({str(tmp_path / 'lock')!r})\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with cpu_kernel._build_lock(tmp_path):
        waited = time.monotonic() - started
        assert not (tmp_path / "lock").exists()
    holder.wait(10)
    assert holder.returncode == 0  # the live builder removed its own lock: nobody took it away
    assert waited > 1.0


def test_the_source_is_built_from_one_path_per_build_folder(tmp_path: Path) -> None:
    source = cpu_kernel.SOURCES[0]
    first = cpu_kernel._stable_source(tmp_path, source)
    assert first.parent == tmp_path and first.read_bytes() == source.read_bytes()
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert cpu_kernel._stable_source(tmp_path, source) == first
    assert first.stat().st_mtime_ns == stamp  # unchanged source: not rewritten, so not rebuilt
