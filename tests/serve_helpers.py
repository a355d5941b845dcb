"""A real uvicorn serving ``medxai.serve.app.create_app`` on loopback, started and stopped inside a test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from medxai.config import ServeConfig
from medxai.serve.app import create_app
from medxai.serve.server import uvicorn_config

START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(run_dir: str | Path, *, engine_factory=None, wait_ready: bool = True, **settings) -> Iterator[str]:
    """Serve ``run_dir`` on 127.0.0.1 at a free port; yield the base URL; stop the server on exit.

    Args:
        engine_factory: see :func:`create_app` (tests hold the model's loading back with one).
        wait_ready: wait until ``/readyz`` answers 200 before yielding.
        settings: :class:`~medxai.config.ServeConfig` fields (default audit database: beside the run).
    """
    port = free_port()
    config = ServeConfig(device="cpu", host="127.0.0.1", port=port, **settings)
    app = create_app(run_dir, config, engine_factory=engine_factory)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))  # what `medxai serve` runs
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if wait_ready:
            wait_until_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until_ready(url: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready in {timeout} s")
