"""Faults, through real `hatrack` processes on real SQLite files and the tiny model:
`hatrack train` SIGKILLed at seeded-random points and inside the artifact write, and
`hatrack prune --yes` of an adapter the server is streaming from.

A kill must never leave a ready version without its artifact, a half-written folder
under a store name, or a checkpoint that --resume trips on; `hatrack check` stays
clean (an orphan it reports is removed by --fix). Disk faults: test_faults_disk.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import register_random_adapters, tiny_registry
from hatrack.trainer.loop import last_checkpoint
from serving import ServerProcess

STEPS, SAVE_EVERY = 8, 2
TRAIN_ARGS = ["--name", "acme", "--base", "tiny", "--quantize", "none", "--max-steps", str(STEPS),
              "--save-steps", str(SAVE_EVERY), "--batch-size", "2", "--max-length", "64", "--eval-split", "0.1"]

# Runs the real CLI, SIGKILLing itself at a point timers cannot hit: at the store's
# rename of a finished temp folder, just before it (files written, nothing under the
# final name) or just after it (the artifact in place, its version row not yet
# written); or halfway through writing a checkpoint's trainer_state.json.
KILL_DRIVER = """
import os, signal, sys
from hatrack.registry.store import TMP_PREFIX
when = sys.argv.pop(1)
real_replace = os.replace

if when.startswith("mid-state:"):
    from transformers.trainer_callback import TrainerState
    real_save = TrainerState.save_to_json

    def save_to_json(self, json_path):
        real_save(self, json_path)
        if os.path.basename(os.path.dirname(json_path)) == when.split(":")[1]:
            os.truncate(json_path, os.path.getsize(json_path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    TrainerState.save_to_json = save_to_json

def replace(src, dst, *args, **kwargs):
    if when in ("before-rename", "after-rename") and os.path.basename(os.fspath(src)).startswith(TMP_PREFIX):
        if when == "after-rename":
            real_replace(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace

if when == "after-register":  # the version is committed; its run folder not yet removed
    import shutil
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if os.path.basename(os.path.dirname(os.fspath(path))) == "runs":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
from hatrack.cli.main import main
sys.argv[0] = "hatrack"
main()
"""


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hatrack.cli.main", *args], capture_output=True, text=True,
                          timeout=300)
    assert not ok or proc.returncode == 0, proc.stderr[-2000:]
    return proc


class TrainRun:
    """A `hatrack train` process whose stderr is timestamped as it arrives."""

    def __init__(self, data: Path, *extra: str, driver: Path | None = None, kill_at: str | None = None) -> None:
        prefix = [str(driver), kill_at] if driver else ["-m", "hatrack.cli.main"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, *prefix, "train", "--data", str(data), *TRAIN_ARGS, *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.chunks: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.chunks.append((time.monotonic() - self.started, chunk.decode(errors="replace")))

    @property
    def text(self) -> str:
        return "".join(c for _, c in self.chunks)

    def when(self, marker: str) -> float:
        """Seconds after start at which `marker` had appeared on stderr."""
        seen = ""
        for at, chunk in self.chunks:
            seen += chunk
            if marker in seen:
                return at
        raise AssertionError(f"{marker!r} never appeared:\n{self.text[-2000:]}")

    def wait_for(self, marker: str, timeout: float = 300.0) -> float | None:
        """Block until `marker` is on stderr; seconds after start, or None if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text:
                return self.when(marker)
            if self.proc.poll() is not None:
                self.reader.join(10)
                return self.when(marker) if marker in self.text else None
            time.sleep(0.02)
        raise AssertionError(f"{marker!r} not seen in {timeout}s")

    def wait(self) -> int:
        code = self.proc.wait(300)
        self.reader.join(10)
        self.ended = time.monotonic() - self.started
        return code

    def kill_after(self, delay: float) -> int:
        time.sleep(max(0.0, delay - (time.monotonic() - self.started)))
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()


def assert_consistent(home: Path) -> list:
    """What a kill must never break; returns the registry's versions."""
    from hatrack.registry import Registry
    from hatrack.registry.store import SHA_RE, TMP_PREFIX, hash_folder
    report = cli("check", "--json", ok=False)
    assert report.returncode == 0 and json.loads(report.stdout)["problems"] == [], report.stdout
    store = home / "store"
    for entry in store.iterdir():  # a store name only ever holds its complete content
        assert entry.name.startswith(TMP_PREFIX) or (SHA_RE.match(entry.name) and hash_folder(entry) == entry.name)
    reg = Registry()
    versions = [reg.get_version(r["name"], r["version"]) for r in reg.list_versions()]
    for v in versions:  # two versions may share a sha256 only by holding identical content
        assert v.status == "ready" and reg.open_artifact(v.sha256, verify=True)
    for run_dir in (home / "runs").glob("acme-*"):
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is not None:  # what --resume would load is whole
            assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    return versions


def age(path: Path, seconds: float) -> None:
    """Move a store entry's mtime into the past, as if the kill happened that long ago."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture()
def train_home(hatrack_home: Path, tiny_base_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    tiny_registry(tiny_base_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is the code of part {i}?"},
                          {"role": "assistant", "content": f"Part {i} has code K{i * 7 % 100}."}]} for i in range(40)]
    data = tmp_path / "parts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    return hatrack_home, data, driver


def test_train_killed_at_random_points_keeps_registry_consistent_and_resumes(train_home):
    home, data, driver = train_home
    store = home / "store"

    # 1. A whole fresh run, killed right after its artifact is placed and before its
    #    version row is written: it times every phase for the random kills below.
    timeline = TrainRun(data, driver=driver, kill_at="after-rename")
    assert timeline.wait() == -signal.SIGKILL, timeline.text[-2000:]
    phases = {"loaded": timeline.when("rows ("), "training": timeline.when("training:"),
              "evaluating": timeline.when("evaluating adapter"), "stored": timeline.ended}
    assert assert_consistent(home) == []
    (orphan,) = [p for p in store.iterdir() if not p.name.startswith(".")]  # whole, but no version claims it
    age(orphan, 3600)
    stale = cli("check", ok=False)
    assert stale.returncode == 1 and "orphan" in stale.stdout and orphan.name[:16] in stale.stdout
    assert "[removed]" in cli("check", "--fix").stdout
    assert assert_consistent(home) == [] and not orphan.exists()

    # 2. --resume (training already done) killed between the temp folder's last write
    #    and its rename: nothing under a store name, the temp folder is left behind.
    resumed = TrainRun(data, "--resume", driver=driver, kill_at="before-rename")
    assert resumed.wait() == -signal.SIGKILL, resumed.text[-2000:]
    assert assert_consistent(home) == []
    (tmp,) = list(store.iterdir())
    assert tmp.name.startswith(".tmp-") and (tmp / "adapter_model.safetensors").is_file()

    # 3. Fresh runs SIGKILLed at seeded-random moments in data loading, training (with
    #    its checkpoint writes) and evaluation: each kill waits for its phase to begin in
    #    the run it kills, then lands at a random point of that phase's length in run 1.
    rng = random.Random(20240611)
    spans = {None: phases["loaded"], "training:": phases["evaluating"] - phases["training"],
             "evaluating adapter": phases["stored"] - phases["evaluating"]}
    delays, killed = [], 0
    for marker, span in spans.items():
        run = TrainRun(data)
        begun = 0.0 if marker is None else run.wait_for(marker)
        assert begun is not None, run.text[-2000:]
        delay = begun + rng.uniform(0.2, 0.7) * span
        delays.append(delay)
        code = run.kill_after(delay)
        assert code in (-signal.SIGKILL, 0), run.text[-2000:]  # a fast run may finish first
        killed += code == -signal.SIGKILL
        versions = assert_consistent(home)
        assert all(v.train_metrics["steps"] == STEPS for v in versions), delay
    assert killed >= 2, f"kills at {delays} mostly landed after the runs ended; phases {phases}"
    print(f"phases {phases}; random kills at {[round(d, 1) for d in delays]}")

    # 4. Killed halfway through writing its second checkpoint's state (written last):
    #    the first checkpoint stays the one to resume from.
    run = TrainRun(data, driver=driver, kill_at=f"mid-state:checkpoint-{2 * SAVE_EVERY}")
    assert run.wait() == -signal.SIGKILL, run.text[-2000:]
    before = assert_consistent(home)
    run_dir = next((home / "runs").glob("acme-*"))
    checkpoint = last_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{SAVE_EVERY}", list(run_dir.iterdir())
    saved_curve = [[e["step"], e["loss"]] for e in json.loads((checkpoint / "trainer_state.json").read_text())
                   ["log_history"] if "loss" in e]

    # 5. --resume completes it: one new ready version, its loss curve carrying on from
    #    the checkpoint; the temp folder left by kill 2 is swept once it is stale.
    age(tmp, 1800)
    final = TrainRun(data, "--resume")
    assert final.wait() == 0, final.text[-3000:]
    first_bar = re.search(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", final.text)
    assert first_bar and first_bar.groups() == (str(SAVE_EVERY), str(STEPS)), final.text[-2000:]
    after = assert_consistent(home)
    (version,) = [v for v in after if v.id not in {b.id for b in before}]
    assert (version.name, version.version) == ("acme", len(before) + 1)
    metrics = version.train_metrics
    assert metrics["resumed"] is True and metrics["steps"] == STEPS
    assert [s for s, _ in metrics["loss_curve"]] == list(range(1, STEPS + 1))
    assert metrics["loss_curve"][:SAVE_EVERY] == saved_curve
    assert {p.name for p in store.iterdir()} == {v.sha256 for v in after}  # no temp folder, no orphan
    assert not run_dir.exists()


# ---------------------------------------------------------------- prune while serving

BASE = "tiny-llama"
QUESTION = [{"role": "user", "content": "Tell me about the parts."}]
LONG = 300  # tokens: a few seconds of streaming on the tiny model, longer than a prune takes


# `hatrack prune --name doomed --keep-last 0 --yes`, imported and waiting for a line on stdin
PRUNE_ON_GO = """
import sys
from hatrack.cli.main import main
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["hatrack", "prune", "--name", "doomed", "--keep-last", "0", "--yes"]
main()
"""


def chat(server: ServerProcess, model: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0})


def answer(server: ServerProcess, model: str, max_tokens: int = 16) -> str:
    resp = chat(server, model, max_tokens)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def stream_lines(server: ServerProcess, model: str, out: list[tuple[float, str]]) -> None:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": QUESTION, "max_tokens": LONG, "temperature": 0, "stream": True}) as resp:
        out.append((time.monotonic(), f"status {resp.status_code}"))
        for line in resp.iter_lines():
            if line:
                out.append((time.monotonic(), line))


@pytest.fixture()
def serving(hatrack_home: Path, tiny_base_dir: Path):
    reg = tiny_registry(tiny_base_dir, BASE)
    register_random_adapters(reg, BASE, tiny_base_dir, hatrack_home.parent / "src", ["doomed", "kept", "cached", "cold"])
    server = ServerProcess(hatrack_home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth").start()
    yield server, reg
    server.stop()


def test_prune_while_streaming_finishes_cleanly_and_later_requests_404(serving, hatrack_home):
    server, reg = serving
    before = {m: answer(server, m) for m in ("kept", BASE)}
    whole = answer(server, "doomed", LONG)

    # Artifact files gone, version still registered: the verified weights already in
    # memory keep serving; one never loaded fails cleanly. The server survives both.
    cached = answer(server, "cached")  # now held in the server's adapter cache
    for name in ("cached", "cold"):
        shutil.rmtree(hatrack_home / "store" / reg.resolve(name).sha256)
    assert answer(server, "cached") == cached
    cold = chat(server, "cold")
    assert cold.status_code == 422 and cold.json()["error"]["code"] == "adapter_unavailable", cold.text
    assert str(hatrack_home) not in cold.text

    # prune the adapter a long stream is reading from, while it streams. The prune is
    # the real CLI in its own process, started (imports done) before the stream, so it
    # acts within a fraction of a second of the go: well inside the stream's life.
    doomed_sha = reg.resolve("doomed").sha256
    pruner = subprocess.Popen([sys.executable, "-c", PRUNE_ON_GO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert pruner.stdout.readline().strip() == "ready"
    # other tenants' long streams share the batch, so the doomed one runs for seconds
    others = [threading.Thread(target=stream_lines, args=(server, m, [])) for m in ("kept", BASE) * 14]
    for other in others:
        other.start()
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=stream_lines, args=(server, "doomed", lines))
    reader.start()
    deadline = time.monotonic() + 60
    while len(lines) < 3 and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    pruned_out, pruned_err = pruner.communicate("go\n", timeout=120)
    pruned_at = time.monotonic()
    reader.join(120)
    for other in others:
        other.join(120)
    assert pruner.returncode == 0, pruned_err[-2000:]
    assert "deleted 1 versions" in pruned_out and not (hatrack_home / "store" / doomed_sha).exists()
    assert lines[0][1] == "status 200" and lines[-1][1] == "data: [DONE]", lines[-3:]
    assert pruned_at < lines[-1][0], (
        f"the stream ended before the prune, nothing was in flight: it lasted {lines[-1][0] - lines[0][0]:.2f}s, "
        f"the prune ended {pruned_at - lines[2][0]:.2f}s after its third line")
    chunks = [json.loads(line[len("data: "):]) for _, line in lines[1:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    # finished normally with the very answer it gave before, or stopped early with an error
    assert (finish == ["length"] and text == whole) or (finish == ["error"] and whole.startswith(text)), finish

    # later requests: the pruned name is gone, everything else answers as before
    for model in ("doomed", "doomed@1"):
        gone = chat(server, model)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
    assert "doomed" not in {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert {m: answer(server, m) for m in ("kept", BASE)} == before
    cli("prune", "--name", "cached", "--keep-last", "0", "--yes")
    assert chat(server, "cached").status_code == 404  # in memory, but the registry says it is gone
    assert server.proc.poll() is None and httpx.get(f"{server.url}/health").status_code == 200


def test_resume_after_the_version_was_registered_does_not_register_twice(train_home):
    """Killed after registration but before its checkpoints were cleaned up: --resume
    must say the run is done, not train and register a second copy."""
    home, data, driver = train_home
    killed = TrainRun(data, driver=driver, kill_at="after-register")
    assert killed.wait() == -signal.SIGKILL, killed.text[-2000:]
    assert [v.version for v in assert_consistent(home)] == [1], killed.text[-3000:]
    assert list((home / "runs").glob("acme-*")), "the kill should have left the run folder"

    again = cli("train", "--data", str(data), *TRAIN_ARGS, "--resume", ok=False)
    assert again.returncode == 1
    assert "already registered as acme@1" in again.stderr and "Traceback" not in again.stderr
    assert [v.version for v in assert_consistent(home)] == [1]
    assert not list((home / "runs").glob("acme-*"))  # the finished run's leftovers are gone
