"""Helpers for tests that run `hatrack serve` as a real process on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


@contextmanager
def hatrack_home_env(home: Path) -> Iterator[Path]:
    """HATRACK_HOME=home while a module-scoped fixture builds and serves (monkeypatch is
    function-scoped); the previous value comes back afterwards."""
    old = os.environ.get("HATRACK_HOME")
    os.environ["HATRACK_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("HATRACK_HOME", None)
        else:
            os.environ["HATRACK_HOME"] = old


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_test_device(args: list[str]) -> list[str]:
    """`hatrack serve` arguments with --device set to the tests' device when
    HATRACK_TEST_DEVICE names one (conftest.TEST_DEVICE); unchanged otherwise."""
    device = os.environ.get("HATRACK_TEST_DEVICE")
    if not device:
        return args
    args = list(args)
    if "--device" in args:
        args[args.index("--device") + 1] = device
    else:
        args += ["--device", device]
    return args


class ServerProcess:
    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.args = on_test_device(list(args))
        self.env = {**os.environ, "HATRACK_HOME": str(home), **(env or {})}
        self.env.pop("HATRACK_DB_URL", None) if "HATRACK_DB_URL" not in (env or {}) else None
        self.log = home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "hatrack.cli.main", "serve", "--port", str(self.port),
               "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
