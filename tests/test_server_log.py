"""What `hatrack serve` says in its log, and the serving defaults it says it chose:
the ready line, and one warning per adapter version served at a precision none of its
scores were measured at. Through a real server process on the tiny model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import tiny_registry, write_peft_adapter
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_base_dir: Path):
    """Default --quantize (auto) on CPU, --max-rank 4, keyed, info log."""
    from hatrack import basemodel
    from hatrack.precision import precision_label
    from hatrack.registry.records import ScoreIn

    served = precision_label("none", basemodel.compute_dtype("cpu"))  # auto on CPU: unquantized
    other = "nf4" if served != "nf4" else "int8"
    home = tmp_path_factory.mktemp("log-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        scores = {"measured-elsewhere": [other, other], "unrecorded": [None], "measured-here": [other, served],
                  "unscored": []}
        for i, (name, precisions) in enumerate(scores.items()):
            folder = write_peft_adapter(tiny_base_dir, home / "src" / name, rank=4, seed=i + 1, scale=0.3)
            registry.register(folder, name=name, base=BASE)
            if precisions:
                registry.add_scores(name, 1, [ScoreIn(metric=f"m{j}", value=1.0, precision=p)
                                              for j, p in enumerate(precisions)])
        wide = write_peft_adapter(tiny_base_dir, home / "src" / "too-wide", rank=8, seed=9, scale=0.3)
        registry.register(wide, name="too-wide", base=BASE)
        _, secret = registry.create_key("ops", ["*"])
        server = ServerProcess(home, "--base", BASE, "--device", "cpu", "--max-rank", "4",
                               "--max-tokens", "2", "--log-level", "info").start()
        yield server, registry, secret, served, other
        server.stop()


def chat(server, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def test_ready_line_says_what_is_served(logged):
    server, registry, _, served, _ = logged
    fingerprint = registry.get_base(BASE).fingerprint
    ready = [line for line in server.log.read_text().splitlines() if "ready: base" in line]
    assert len(ready) == 1, server.log.read_text()[-2000:]
    line = ready[0]
    assert f"base {BASE} (fingerprint {fingerprint[:12]})" in line
    assert "device cpu" in line and f"precision {served}" in line  # auto on CPU: not quantized
    assert "max rank 4" in line and "auth keys" in line
    assert "LoRA decode on the compiled CPU kernel" in line or "LoRA decode on torch ops" in line


def test_max_rank_refuses_a_wider_adapter_and_serves_the_others(logged):
    server, _, secret, _, _ = logged
    resp = chat(server, secret, "too-wide")
    assert resp.status_code == 422, resp.text
    assert "rank 8" in resp.json()["error"]["message"]
    assert chat(server, secret, "unscored").status_code == 200


def test_precision_warnings_once_per_adapter_version(logged):
    server, _, secret, served, other = logged
    for _ in range(3):
        for name in ("measured-elsewhere", "unrecorded", "measured-here", "unscored"):
            assert chat(server, secret, name).status_code == 200
    log = server.log.read_text()
    elsewhere = f"serving measured-elsewhere@1 at {served}; its scores were measured at {other}"
    assert log.count(elsewhere) == 1, log[-3000:]
    assert log.count(f"serving unrecorded@1 at {served}; its scores do not record the precision") == 1
    assert "serving measured-here@1" not in log and "serving unscored@1" not in log


@pytest.mark.parametrize(("dtype", "precision", "positions"), [("float32", "fp32", 390), ("bfloat16", "bf16", 781)])
def test_dtype_chooses_what_the_base_computes_in_whatever_the_cpu(tmp_path, tiny_base_dir: Path, dtype, precision,
                                                                  positions):
    """--dtype overrides auto (bf16 on CPUs with AVX-512 BF16 or AMX, else fp32): the ready line
    names it, and a KV position costs what that dtype costs (0.0002 GB: 512 bytes a position
    of the tiny model in fp32, 256 in bf16)."""
    with hatrack_home_env(tmp_path):
        tiny_registry(tiny_base_dir, BASE)
        server = ServerProcess(tmp_path, "--base", BASE, "--device", "cpu", "--dtype", dtype, "--no-auth",
                               "--kv-cache-gb", "0.0002", "--log-level", "info",
                               env={"HATRACK_CPU_KERNEL": "0"}).start()
        try:
            reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                               json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert reply.status_code == 200, reply.text
        finally:
            server.stop()
    ready = [line for line in server.log.read_text().splitlines() if "ready: base" in line]
    assert ready and f"precision {precision}," in ready[0] and f"({positions} positions)" in ready[0], ready
