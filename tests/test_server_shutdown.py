"""SIGTERM on `hatrack serve`: stop accepting, let in-flight answers finish, exit 0."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"


@pytest.fixture()
def tiny_server(tmp_path: Path, tiny_base_dir: Path):
    home = tmp_path / "home"
    home.mkdir()
    with hatrack_home_env(home):
        tiny_registry(tiny_base_dir, BASE)
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--shutdown-timeout", "60").start()
        yield server
        server.stop(timeout=5)


def test_sigterm_drains_a_streaming_answer_then_exits_zero(tiny_server: ServerProcess):
    c = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    stream = c.completions.create(model=BASE, prompt="Once upon a time", max_tokens=300,
                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)  # the request is in flight now
    assert first.choices

    exit_code: dict[str, int | None] = {}
    stopper = threading.Thread(target=lambda: exit_code.setdefault("rc", tiny_server.stop(timeout=60)))
    stopper.start()
    rest = list(chunks)  # the answer keeps coming while the server drains
    stopper.join(70)

    finishes = [ch.choices[0].finish_reason for ch in rest if ch.choices and ch.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("length", "stop")
    usage = [ch.usage for ch in rest if ch.usage is not None]
    assert usage and usage[-1].completion_tokens >= 1
    assert exit_code["rc"] == 0
    with pytest.raises(httpx.TransportError):  # and it no longer accepts anyone
        httpx.get(f"{tiny_server.url}/health", timeout=2)
