"""Ray Serve: `python -m pipeline.serve --ray --replicas 2` on a local Ray instance, tiny-sd on CPU.

Concurrent requests all succeed, both replicas serve some (each names itself in X-Replica), and SIGINT takes
the whole thing down: the process exits 0 and leaves no Ray process behind in its process group.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from pipeline.errors import InvalidInputError  # noqa: E402
from pipeline.serve.launch import start_server  # noqa: E402
from pipeline.serve.ray_app import Scaling, build  # noqa: E402

WAVE = 8  # concurrent requests at a time
BOTH_SERVING_S = 120  # the server is ready once one replica is; the other may still be starting (2 CPU cores)


@pytest.mark.slow
def test_two_replicas_share_the_requests_and_stop_cleanly(tiny_sd: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    args = ["--ray", "--replicas", "2", "--model", str(tiny_sd), "--device", "cpu", "--backend", "torch"]
    args += ["--cache-dir", str(tmp_path), "--max-batch", "2"]
    server = start_server(args, log_path=tmp_path / "ray.log", ready_timeout=240)
    ready = time.monotonic() - start
    try:

        async def wave() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                url = f"{server.url}/v1/images/generations"
                body = {"size": "32x32", "steps": 2, "response_format": "b64_json"}
                return await asyncio.gather(
                    *[client.post(url, json={"prompt": f"p{i}", **body}) for i in range(WAVE)]
                )

        served: dict[str, int] = {}
        deadline = time.monotonic() + BOTH_SERVING_S
        while time.monotonic() < deadline:
            responses = asyncio.run(wave())
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            for r in responses:
                assert r.headers["X-Replica"] == r.json()["replica"]
                served[r.json()["replica"]] = served.get(r.json()["replica"], 0) + 1
            if len(served) == 2:
                break
            time.sleep(1.0)
        assert len(served) == 2, f"one replica served everything: {served}\n{server.log_tail()}"
    finally:
        stop = time.monotonic()
        code = server.stop(timeout=90)
        stopped = time.monotonic() - stop
    assert code == 0, server.log_tail()
    with pytest.raises(ProcessLookupError):  # raylet, GCS, workers: all gone with the server
        os.killpg(server.process.pid, 0)
    print(
        f"ray: ready in {ready:.1f} s, {sum(served.values())} requests {served}, stopped in {stopped:.1f} s"
    )


def test_scaling_bounds_and_the_serve_run_builder_arguments() -> None:
    assert Scaling.from_args(3, None, None).options(4) == {"num_replicas": 3}
    auto = Scaling.from_args(1, 1, 8).options(4)["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 8 and auto["target_ongoing_requests"] == 4
    for bad in ((1, 2, None), (1, 3, 2), (0, None, None)):
        with pytest.raises(InvalidInputError):
            Scaling.from_args(*bad)
    with pytest.raises(InvalidInputError, match="unknown argument"):
        build({"model": "tiny-sd", "device": "cpu", "colour": "red"})
