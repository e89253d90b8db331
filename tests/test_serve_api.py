"""The server as a client sees it (tiny-sd on CPU, batches of 4): images, progress, batching, 400s, CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from serve_client import FAST, LONG, disconnect, health_is, hold_slot, post, tiny_sd_server, until  # noqa: E402

from pipeline.errors import InvalidInputError  # noqa: E402
from pipeline.serve.app import MAX_BODY_BYTES  # noqa: E402
from pipeline.serve.config import LoraSpec  # noqa: E402
from pipeline.serve.launch import ServerProcess  # noqa: E402
from pipeline.serve.schemas import MAX_PROMPT_CHARS  # noqa: E402

CLI_KEYS = {
    "prompt",
    "negative_prompt",
    "seed",
    "size",
    "steps",
    "guidance_scale",
    "model",
    "backend",
    "index",
}


@pytest.fixture(scope="module")
def server(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("serve")
    extra = ["--max-batch", "4", "--max-queue", "16", "--image-dir", str(root / "images")]
    with tiny_sd_server(tiny_sd, root, extra) as started:
        yield started


def png_of(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---- generation ---------------------------------------------------------------------------------------
def test_b64_json_gives_pngs_with_the_cli_metadata_one_seed_per_image(
    server: ServerProcess,
) -> None:
    r = post(
        server,
        {
            "prompt": "a red fox",
            "n": 2,
            "size": "48x32",
            "steps": 2,
            "seed": 7,
            "response_format": "b64_json",
            "negative_prompt": "blur",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [7, 8]
    assert body["settings"]["width"] == 48 and body["settings"]["height"] == 32 and body["size"] == "48x32"
    for i, item in enumerate(body["data"]):
        image = png_of(item)
        assert image.size == (48, 32)  # OpenAI's size is WIDTHxHEIGHT
        assert CLI_KEYS <= set(image.text)
        assert image.text["prompt"] == "a red fox" and image.text["negative_prompt"] == "blur"
        assert (
            image.text["seed"] == str(7 + i) and image.text["size"] == "48x32" and image.text["steps"] == "2"
        )
    assert r.headers["X-Request-Id"] == body["request_id"]
    assert r.headers["X-Replica"] == body["replica"]


def test_url_response_serves_the_png_and_nothing_outside_the_store(server: ServerProcess) -> None:
    r = post(server, {"prompt": "a cat", **FAST, "seed": 3})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(server.url + "/v1/images/") and url.endswith(".png")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(got.content))
    assert image.text["seed"] == "3" and image.size == (32, 32)
    for bad in ("0" * 32, "..%2F..%2Fetc%2Fpasswd", "not-an-id"):
        miss = httpx.get(f"{server.url}/v1/images/{bad}.png")
        assert miss.status_code == 404 and "error" in miss.json()


def test_models_and_health(server: ServerProcess) -> None:
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card["object"] == "model" and card["family"] == "sd" and card["size_multiple"] == 8
    assert card["max_n"] == 4
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 4


def test_stream_sends_progress_then_the_image(server: ServerProcess) -> None:
    # enough steps that progress is seen running more than once, even on a fast machine
    body = {"prompt": "a cat", "size": "32x32", "steps": 60, "stream": True, "response_format": "b64_json"}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [
            (
                block.split("\n")[0].removeprefix("event: "),
                json.loads(block.split("\n")[1].removeprefix("data: ")),
            )
            for block in r.read().decode().strip().split("\n\n")
        ]
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "image_generation.completed" and set(kinds[:-1]) == {"image_generation.progress"}
    steps = [
        data["step"]
        for kind, data in events
        if kind == "image_generation.progress" and data["state"] == "running"
    ]
    assert steps == sorted(steps) and len(steps) >= 2
    assert png_of(events[-1][1]["data"][0]).size == (32, 32)


def test_progress_endpoint_follows_a_request_by_its_id(server: ServerProcess) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], int]:
        async with httpx.AsyncClient(timeout=60) as client:
            progress: list[dict[str, Any]] = []

            async def follow() -> None:  # opened before the request: the server waits for it
                async with client.stream("GET", f"{server.url}/v1/progress/fox-1") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            progress.append(json.loads(line.removeprefix("data: ")))

            watcher = asyncio.create_task(follow())
            await asyncio.sleep(0.2)
            r = await client.post(
                f"{server.url}/v1/images/generations",
                json={
                    "prompt": "a fox",
                    "size": "32x32",
                    "steps": 60,
                    "request_id": "fox-1",
                },  # long enough to be seen running
            )
            await asyncio.wait_for(watcher, 10)
            return progress, r.status_code

    progress, status = asyncio.run(scenario())
    assert status == 200
    assert progress[-1]["state"] == "done" and any(p["state"] == "running" for p in progress)
    assert httpx.get(f"{server.url}/v1/progress/nobody-{time.time_ns()}", timeout=20).status_code == 404


# ---- batching -----------------------------------------------------------------------------------------
def test_same_shape_requests_share_one_pipeline_call_and_match_solo_images(
    server: ServerProcess,
) -> None:
    shape = {"size": "32x32", "steps": 3, "response_format": "b64_json"}
    requests = [{"prompt": p, "seed": s, **shape} for p, s in (("a cat", 11), ("a dog", 12), ("a fox", 13))]
    other = {"prompt": "a cat", "seed": 11, "size": "48x32", "steps": 3, "response_format": "b64_json"}

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, int]:
        before = httpx.get(f"{server.url}/health").json()["batches"]
        # long enough that it is still running when all four have queued, however loaded the machine
        blocker = await hold_slot(server, {"prompt": "blocker", **LONG})
        await until(health_is(server, running=1))  # the worker is busy: the next requests queue up
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{server.url}/v1/images/generations"
            tasks = [asyncio.create_task(client.post(url, json=body)) for body in requests]
            odd = asyncio.create_task(client.post(url, json=other))
            await until(health_is(server, queued=4))
            await disconnect(*blocker)
            responses = await asyncio.gather(*tasks)
            odd_response = await odd
        return responses, odd_response, httpx.get(f"{server.url}/health").json()["batches"] - before

    responses, odd, new_batches = asyncio.run(scenario())
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({b["batch"]["id"] for b in bodies}) == 1 and bodies[0]["batch"]["images"] == 3
    assert odd.status_code == 200 and odd.json()["batch"]["id"] != bodies[0]["batch"]["id"]
    assert new_batches == 3  # the blocker, the three same-shape requests, the other size
    for request, body in zip(requests, bodies, strict=True):
        solo = post(server, request).json()
        assert solo["batch"]["images"] == 1
        batched, alone = pixels(png_of(body["data"][0])), pixels(png_of(solo["data"][0]))
        # the same image: a batched matmul may round the last float bit differently, never more
        assert np.abs(batched - alone).max() <= 1, request
        assert (batched == alone).mean() > 0.99
    assert not np.array_equal(pixels(png_of(bodies[0]["data"][0])), pixels(png_of(bodies[1]["data"][0])))


# ---- bad input ----------------------------------------------------------------------------------------
BAD = [
    ({"prompt": "x", "size": "abc"}, "size"),
    ({"prompt": "x", "size": "30x32"}, "size"),
    ({"prompt": "x", "size": "0x32"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 5}, "n"),  # more than --max-batch 4
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 10_000}, "steps"),
    ({"prompt": "x", "steps": "4"}, "steps"),
    ({"prompt": "x", "steps": 2.5}, "steps"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"size": "32x32"}, "prompt"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "scheduler": "NoSuchScheduler"}, "scheduler"),
    ({"prompt": "x", "lora": "nope"}, "lora"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "step": 4}, "step"),
    ({"prompt": "x", "request_id": "../etc"}, "request_id"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": "x", "negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
]


def test_bad_requests_are_400_with_an_openai_error_before_any_work(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/health").json()["batches"]
    for body, param in BAD:
        r = post(server, body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and error["message"], (body, error)
    for raw, kind in (
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"prompt=x", None),
    ):
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(f"{server.url}/v1/images/generations", content=raw, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert httpx.get(f"{server.url}/health").json()["batches"] == before  # nothing reached the pipeline


def test_a_body_over_the_limit_is_413_before_it_is_read_whole(server: ServerProcess) -> None:
    """A hostile body is refused by its declared length, or, sent chunked without one, once it passes the
    limit; the server goes on serving."""
    huge = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    for content in (huge, chunks()):
        r = httpx.post(f"{server.url}/v1/images/generations", content=content, timeout=60)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "body_too_large" and str(MAX_BODY_BYTES) in error["message"]
    ok = post(server, {"prompt": "x" * MAX_PROMPT_CHARS, **FAST, "response_format": "b64_json"})
    assert ok.status_code == 200, (
        ok.text
    )  # a prompt at the limit is served (its tokens past the encoder's cut)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


# ---- the command line ---------------------------------------------------------------------------------
def test_bad_server_arguments_are_one_line_and_exit_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.serve", "--model", "tiny-sd", "--max-batch", "0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--max-batch must be at least 1" in r.stderr


def test_lora_arguments_name_path_and_scale() -> None:
    assert LoraSpec.parse("px=/loras/pixel.safetensors:0.8") == LoraSpec(
        "px", "/loras/pixel.safetensors", 0.8
    )
    assert LoraSpec.parse("px=/loras/pixel.safetensors") == LoraSpec("px", "/loras/pixel.safetensors", 1.0)
    assert LoraSpec.parse("hub=org/repo:weird:name") == LoraSpec("hub", "org/repo:weird:name", 1.0)
    for bad in ("nopath", "=x", "px="):
        with pytest.raises(InvalidInputError, match="NAME=PATH"):
            LoraSpec.parse(bad)


def test_load_script_reports_throughput_and_latency(server: ServerProcess, tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    assert spec is not None and spec.loader is not None
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    out = tmp_path / "load.json"
    argv = [
        "--url",
        server.url,
        "--clients",
        "3",
        "--requests",
        "2",
        "--size",
        "32x32",
        "--steps",
        "2",
    ]
    assert load_test.main([*argv, "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["ok"] == run["images"] == 6 and run["max_batch"] == 4
    assert run["images_per_s"] > 0 and 0 < run["latency_p50_s"] <= run["latency_p99_s"]
    assert 1 <= run["mean_batch"] <= 3 and run["warm_up"]["batch_sizes_seen"] == [1, 2, 3, 4]
