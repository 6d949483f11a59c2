"""`hatrack serve --quantize int8wo`: a real server on the tiny model says it serves at
precision int8wo, answers the base and an adapter, and warns once that an adapter scored
at fp32 is served at int8wo. A bad --quantize, --dtype or --kv-cache-gb is refused in one
`error:` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import tiny_registry, write_peft_adapter
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir: Path):
    from hatrack.registry.records import ScoreIn

    home = tmp_path_factory.mktemp("int8wo-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        folder = write_peft_adapter(tiny_base_dir, home / "src" / "acme", rank=4, seed=1, scale=0.3)
        registry.register(folder, name="acme", base=BASE)
        registry.add_scores("acme", 1, [ScoreIn(metric="eval_loss", value=1.0, precision="fp32")])
        server = ServerProcess(home, "--base", BASE, "--quantize", "int8wo", "--device", "cpu", "--no-auth",
                               "--max-tokens", "4", "--log-level", "info").start()
        yield server
        server.stop()


def chat(server, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})


def test_serves_base_and_adapter_at_int8wo_and_says_so(server):
    base, adapter = chat(server, BASE), chat(server, "acme")
    assert base.status_code == 200 and adapter.status_code == 200, (base.text, adapter.text)
    assert adapter.json()["usage"]["completion_tokens"] >= 1
    chat(server, "acme")
    log = server.log.read_text()
    ready = [line for line in log.splitlines() if "ready: base" in line]
    assert len(ready) == 1 and "precision int8wo" in ready[0], log[-2000:]
    assert log.count("serving acme@1 at int8wo; its scores were measured at fp32") == 1, log[-2000:]


@pytest.mark.parametrize(("args", "message"), [
    (["--quantize", "int4"], "--quantize must be one of auto, nf4, int8, int8wo, none; got 'int4'"),
    (["--dtype", "half"], "--dtype must be one of auto, float32, bfloat16; got 'half'"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be a positive number of GB; got 0.0"),
])
def test_a_bad_serve_option_is_refused_in_one_error_line(hatrack_home, args, message):
    proc = subprocess.run([sys.executable, "-m", "hatrack.cli.main", "serve", *args, "--no-auth"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HATRACK_HOME": str(hatrack_home)})
    assert (proc.returncode, proc.stderr) == (1, f"error: {message}\n")
