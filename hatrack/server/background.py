"""A real uvicorn server on a free loopback port, on a thread of this process: what
`hatrack demo` and the benchmark use to talk to hatrack through the OpenAI client."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from hatrack.errors import HatrackError
from hatrack.server.app import ServeConfig, create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BackgroundServer:
    def __init__(self, config: ServeConfig, registry=None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.app = create_app(config, registry)
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                           timeout_graceful_shutdown=int(config.shutdown_timeout))
        )
        self._thread = threading.Thread(target=self._server.run, name="hatrack-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 300.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"{self.url}/ready", timeout=2)
                if answer.status_code == 200:
                    return self
                state = self.app.state.hatrack
                if state.load_error:
                    raise HatrackError(f"server failed to start: {state.load_error}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise HatrackError(f"server on {self.url} not ready after {ready_timeout:.0f}s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
