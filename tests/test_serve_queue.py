"""A server with one slot, one queue place, an 8 s timeout: 429, disconnects, 504, duplicate ids, stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_client import FAST, LONG, disconnect, health_is, hold_slot, post, tiny_sd_server, until  # noqa: E402

from pipeline.serve.launch import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One request running, one waiting; the module's last test stops it."""
    root = tmp_path_factory.mktemp("serve-queue")
    extra = ["--max-batch", "1", "--max-queue", "1", "--timeout", "8", "--image-dir", str(root / "img2")]
    with tiny_sd_server(tiny_sd, root, extra) as started:
        yield started


# ---- queue, disconnect, timeout -----------------------------------------------------------------------
def test_full_queue_is_429_with_retry_after(server: ServerProcess) -> None:
    # one running, one waiting
    async def scenario() -> httpx.Response:
        running = await hold_slot(server, {"prompt": "a", **LONG})
        await until(health_is(server, running=1))
        waiting = await hold_slot(server, {"prompt": "b", **LONG})
        await until(health_is(server, queued=1))
        try:
            async with httpx.AsyncClient() as client:
                return await client.post(f"{server.url}/v1/images/generations", json={"prompt": "c", **FAST})
        finally:
            await disconnect(*waiting)
            await disconnect(*running)
            await until(health_is(server, running=0, queued=0))

    r = asyncio.run(scenario())
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"


def test_a_client_that_disconnects_frees_its_slot(server: ServerProcess) -> None:
    async def scenario() -> tuple[float, float, httpx.Response]:
        running = await hold_slot(server, {"prompt": "a", **LONG})
        await until(health_is(server, running=1))
        waiting = await hold_slot(server, {"prompt": "b", **LONG})
        await until(health_is(server, queued=1))
        await disconnect(*waiting)  # a queued request leaves the queue
        queue_freed = await until(health_is(server, queued=0), timeout=3)
        third = await hold_slot(server, {"prompt": "c", **FAST})  # accepted again: no 429
        await until(health_is(server, queued=1), timeout=3)
        await disconnect(*running)  # the running batch is abandoned at its next step
        abandoned = await until(health_is(server, running=0, queued=0), timeout=10)
        third_response = await third[1]
        await third[0].aclose()
        return queue_freed, abandoned, third_response

    queue_freed, abandoned, third = asyncio.run(scenario())
    assert queue_freed < 1.0 and abandoned < 5.0  # the LONG request would have taken ~20 s more
    assert third.status_code == 200


def test_a_request_past_the_timeout_gets_504_and_frees_the_worker(server: ServerProcess) -> None:
    start = time.monotonic()
    r = post(server, {"prompt": "slow", **LONG})
    took = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert 7.5 < took < 12  # --timeout 8
    asyncio.run(until(health_is(server, running=0, queued=0), timeout=5))


def test_duplicate_request_id_is_400(server: ServerProcess) -> None:
    async def scenario() -> httpx.Response:
        first = await hold_slot(server, {"prompt": "a", **LONG, "request_id": "same"})
        await until(health_is(server, running=1))
        try:
            async with httpx.AsyncClient() as client:
                body = {"prompt": "b", **FAST, "request_id": "same"}
                return await client.post(f"{server.url}/v1/images/generations", json=body)
        finally:
            await disconnect(*first)
            await until(health_is(server, running=0))

    r = asyncio.run(scenario())
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"


def test_stopping_the_server_ends_every_accepted_request(server: ServerProcess) -> None:
    # the last test on the server: it stops it
    async def scenario() -> tuple[list[Any], int, float]:
        running = await hold_slot(server, {"prompt": "a", **LONG})
        await until(health_is(server, running=1))
        waiting = await hold_slot(server, {"prompt": "b", **LONG})
        await until(health_is(server, queued=1))
        start = time.monotonic()
        code = await asyncio.to_thread(server.stop, 60)
        answers = await asyncio.gather(running[1], waiting[1], return_exceptions=True)
        for client, _ in (running, waiting):
            await client.aclose()
        return answers, code, time.monotonic() - start

    answers, code, seconds = asyncio.run(scenario())
    assert code == 0 and seconds < 20
    for answer in answers:  # an error answer or a closed connection, never a request left hanging
        assert isinstance(answer, httpx.TransportError) or answer.status_code >= 500, answer
