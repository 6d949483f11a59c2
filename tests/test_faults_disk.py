"""A registry on a full or read-only disk: the `hatrack` command fails with one line
naming the file and the condition, and everything stored before is still there once
the condition is lifted.

Simulated without mocks. "Full" is a small tmpfs filled by a file (needs mount, so
root); where mounting is not allowed those tests skip, and a file size limit
(RLIMIT_FSIZE, writes fail with EFBIG) stands in for the artifact write. "Read-only"
is a read-only bind mount of the registry folder (root: chmod does not stop root);
where mounting is not allowed, a SQLite connection opened with `mode=ro` through
HATRACK_DB_URL stands in.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_registry, write_peft_adapter
from test_faults import TrainRun, train_home  # noqa: F401  (a fixture)


def hatrack(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hatrack.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def one_clear_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """The failure a user sees: exit 1, one `error:` line naming what is wrong."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(p in line for p in parts), line
    return line


def snapshot(**env: str) -> tuple[list, list[str]]:
    """What is stored: every version as `hatrack list --json` shows it, and the store."""
    listed = hatrack("list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    home = Path(env.get("HATRACK_HOME") or os.environ["HATRACK_HOME"])
    return json.loads(listed.stdout), sorted(p.name for p in (home / "store").iterdir())


def assert_intact(before: tuple[list, list[str]], **env: str) -> None:
    assert snapshot(**env) == before
    check = hatrack("check", **env)
    assert check.returncode == 0 and f"checked {len(before[0])} versions" in check.stdout, check.stdout


def fill(folder: Path, leave: int = 0, name: str = "filler") -> Path:
    """Fill the file system holding `folder`, then give `leave` bytes back."""
    filler = folder / name
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\xff" * 65536):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture()
def mounts():
    """mount(options, target): a real mount, undone after the test; skips where not allowed."""
    done: list[Path] = []

    def mount(options: list[str], target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if proc.returncode != 0:
            pytest.skip(f"mounting is not allowed here: {proc.stderr.strip()[:200]}")
        if target not in done:
            done.append(target)
        return target

    yield mount
    for target in reversed(done):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def stock(tiny_base_dir: Path, tmp_path: Path) -> Path:
    """Two tagged versions in the current HATRACK_HOME; returns a third adapter folder,
    not registered. Nothing is left holding the database open."""
    reg = tiny_registry(tiny_base_dir)
    folders = [write_peft_adapter(tiny_base_dir, tmp_path / f"adapter-{i}", seed=i) for i in range(3)]
    for folder in folders[:2]:
        reg.register(folder, name="acme", base="tiny", tags={"customer": "acme"})
    reg.engine.dispose()
    return folders[2]


@pytest.fixture()
def stocked(hatrack_home: Path, tiny_base_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    return hatrack_home, stock(tiny_base_dir, tmp_path)


def test_full_disk_fails_register_and_tag_cleanly_and_loses_nothing(tiny_base_dir, tmp_path, mounts, monkeypatch):
    disk = mounts(["-t", "tmpfs", "-o", "size=4m", "tmpfs"], tmp_path / "disk")
    home = disk / "home"
    monkeypatch.setenv("HATRACK_HOME", str(home))
    monkeypatch.delenv("HATRACK_DB_URL", raising=False)
    folder = stock(tiny_base_dir, tmp_path)
    before = snapshot()

    # room to open the registry, not for the artifact: the store write fails, whole
    filler = fill(disk, leave=48 * 1024)
    one_clear_line(hatrack("register", str(folder), "--name", "acme", "--base", "tiny"),
                   f"artifact store {home / 'store'}", "disk full")
    assert sorted(p.name for p in (home / "store").iterdir()) == before[1]  # no temp folder, nothing half-stored

    # no room at all: the database cannot even be opened for the tag
    rest = fill(disk, name="rest")
    one_clear_line(hatrack("tag", "acme@1", "stage=gold"), str(home / "registry.db"), "disk full")

    filler.unlink()
    rest.unlink()
    assert_intact(before)
    assert hatrack("register", str(folder), "--name", "acme", "--base", "tiny").returncode == 0


def test_file_size_limit_fails_the_artifact_write_cleanly(stocked):
    """Where no small disk can be mounted: a write limit (RLIMIT_FSIZE) below the
    adapter's size makes the store's copy fail with EFBIG, as a full disk would."""
    home, folder = stocked
    before = snapshot()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

    proc = subprocess.run([sys.executable, "-m", "hatrack.cli.main", "register", str(folder), "--name", "acme",
                           "--base", "tiny"], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    one_clear_line(proc, f"artifact store {home / 'store'}", "file size limit")
    assert_intact(before)


def test_full_disk_at_the_end_of_train_keeps_the_run_for_resume(train_home, tiny_base_dir, tmp_path, mounts,
                                                               monkeypatch):
    """The registry database on a small disk that fills while `hatrack train` runs
    (its artifact store elsewhere): the run fails at registration, clearly, and
    `--resume` registers it once there is room again."""
    home, data, _ = train_home
    disk = mounts(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], tmp_path / "dbdisk")
    monkeypatch.setenv("HATRACK_DB_URL", f"sqlite:///{disk / 'registry.db'}")
    reg = tiny_registry(tiny_base_dir)
    reg.register(write_peft_adapter(tiny_base_dir, tmp_path / "older"), name="acme", base="tiny")
    reg.engine.dispose()
    before = snapshot()

    run = TrainRun(data)
    while "rows (" not in run.text and run.proc.poll() is None:  # the registry is open by now
        time.sleep(0.05)
    filler = fill(disk)
    one_clear_line(subprocess.CompletedProcess([], run.wait(), "", run.text), str(disk / "registry.db"), "disk full")
    assert "8/8" in run.text  # it failed at the end, not before training

    filler.unlink()
    assert snapshot() == before  # no version row, and no artifact left unclaimed in the store
    resumed = hatrack("train", "--data", str(data), "--name", "acme", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["version"] == 2
    listed, store = snapshot()
    assert sorted(v["version"] for v in listed) == [1, 2]
    assert set(store) == {v["sha256"] for v in listed} and hatrack("check").returncode == 0


def test_read_only_disk_fails_register_tag_and_train_cleanly(stocked, tmp_path, mounts):
    """A read-only mount of the registry folder. With nothing else holding the registry
    open, SQLite cannot open a WAL database there at all, so `train` stops before
    training; while another process holds it open (a server would), reads work and
    the writes fail."""
    home, folder = stocked
    before = snapshot()
    view = mounts(["--bind", str(home)], tmp_path / "ro-view")
    mounts(["-o", "remount,ro,bind"], view)
    db, ro = str(view / "registry.db"), {"HATRACK_HOME": str(view)}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Hours?", "completion": "9 to 5."}) + "\n")

    register = hatrack("register", str(folder), "--name", "acme", "--base", "tiny", **ro)
    one_clear_line(register, db, "read-only file system")
    one_clear_line(hatrack("tag", "acme@1", "stage=gold", **ro), db, "read-only file system")
    train = hatrack("train", "--data", str(data), "--name", "acme", "--base", "tiny", "--max-steps", "2", **ro)
    one_clear_line(train, db, "read-only file system")
    assert "training:" not in train.stderr

    holder = sqlite3.connect(home / "registry.db")  # through the writable path, as a server would
    try:
        holder.execute("SELECT count(*) FROM adapter_versions").fetchone()
        one_clear_line(hatrack("tag", "acme@1", "stage=gold", **ro), db, "read-only file system", "readonly")
        one_clear_line(hatrack("register", str(folder), "--name", "acme", "--base", "tiny", **ro),
                       f"artifact store {view / 'store'}", "read-only file system")
    finally:
        holder.close()
    assert_intact(before)


def test_registry_opened_read_only_fails_writes_cleanly(stocked):
    """Where no read-only mount can be made: SQLite's own read-only mode."""
    home, folder = stocked
    before = snapshot()
    url = f"sqlite:///file:{home / 'registry.db'}?mode=ro&uri=true"
    one_clear_line(hatrack("tag", "acme@1", "stage=gold", HATRACK_DB_URL=url), "registry.db", "read-only")
    one_clear_line(hatrack("register", str(folder), "--name", "acme", "--base", "tiny", HATRACK_DB_URL=url),
                   "registry.db", "read-only")
    assert_intact(before)


def test_full_disk_under_training_checkpoints_is_one_line(train_home, tmp_path, mounts, monkeypatch):
    """HATRACK_HOME (run folders, checkpoints, store) on a disk that fills while
    `hatrack train` runs, the registry database elsewhere: the run stops with one line
    saying what is full, and registers nothing."""
    home, data, _ = train_home
    monkeypatch.setenv("HATRACK_DB_URL", f"sqlite:///{home / 'registry.db'}")
    disk = mounts(["-t", "tmpfs", "-o", "size=4m", "tmpfs"], tmp_path / "homedisk")
    monkeypatch.setenv("HATRACK_HOME", str(disk))

    run = TrainRun(data)
    while "rows (" not in run.text and run.proc.poll() is None:  # data read, training about to start
        time.sleep(0.05)
    filler = fill(disk)
    line = one_clear_line(subprocess.CompletedProcess([], run.wait(), "", run.text), "disk full")
    assert str(disk) in line
    filler.unlink()
    listed = hatrack("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
