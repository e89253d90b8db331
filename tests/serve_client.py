"""A tiny-sd `python -m pipeline.serve` process for tests, and the client helpers test_serve_*.py share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.serve.launch import ServerProcess, start_server

FAST = {"size": "32x32", "steps": 2}
# holds a slot far longer than any test waits: ~20 s on an idle 2-core CPU (10 ms a step), more when loaded;
# each test ends it by disconnecting
LONG = {"size": "64x64", "steps": 2000}


@contextmanager
def tiny_sd_server(tiny_sd: Path, root: Path, extra: list[str]) -> Iterator[ServerProcess]:
    """tiny-sd on the CPU (torch backend, its cache and log in `root`) with `extra` arguments; stopped on
    exit, also when it never gets ready."""
    args = ["--model", str(tiny_sd), "--device", "cpu", "--backend", "torch", "--cache-dir", str(root)]
    args += ["--max-steps", str(LONG["steps"])]
    server = start_server(args + extra, log_path=root / "server.log", wait=False)
    try:
        yield server.wait_ready(300)
    finally:
        server.stop()


def post(server: ServerProcess, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120, **kwargs)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> float:
    """Seconds until `check()` holds; fails the test past `timeout`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def health_is(server: ServerProcess, **want: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        async with httpx.AsyncClient() as client:
            h = (await client.get(f"{server.url}/health")).json()
        return all(h[k] == v for k, v in want.items())

    return check


async def hold_slot(
    server: ServerProcess, body: dict[str, Any]
) -> tuple[httpx.AsyncClient, asyncio.Task[Any]]:
    """A request on its own connection; cancel the task and close the client to disconnect it."""
    client = httpx.AsyncClient(timeout=120)
    task = asyncio.create_task(client.post(f"{server.url}/v1/images/generations", json=body))
    return client, task


async def disconnect(client: httpx.AsyncClient, task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()
