"""Start `python -m pipeline.serve` as a child process on a free loopback port and wait until it is ready.

For tests, scripts/browser_check.py and scripts/load_test.py. Standard library only (it runs where the
server's own packages may not be installed in the client's environment).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def health(self) -> dict[str, Any]:
        return get_json(f"{self.url}/health")

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Return once /health answers; RuntimeError (with the log's tail) if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                self.health()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT (a clean stop: uvicorn drains, Ray shuts down), then SIGKILL of the group if it hangs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def start_server(
    args: Sequence[str],
    *,
    log_path: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout: float = 300.0,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> ServerProcess:
    """`python -m pipeline.serve ARGS --host HOST --port PORT`, in its own process group, its output in
    `log_path`; with `wait`, once it is ready (see ServerProcess.wait_ready)."""
    port = port or free_port(host)
    log_path = Path(log_path)
    log: IO[bytes] = log_path.open("wb")
    cmd = [sys.executable, "-m", "pipeline.serve", *args, "--host", host, "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    server = ServerProcess(process, f"http://{host}:{port}", log_path)
    return server.wait_ready(ready_timeout) if wait else server


@contextmanager
def running_server(args: Sequence[str], **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
