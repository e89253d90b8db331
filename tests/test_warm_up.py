"""Warm-up: sizes served once before the first request (`Pipeline.warm_up`, the server's `--warm-size`).

What it buys is measured on the GPU (docs/benchmarks.md, "SD's new-size penalty"); here: it serves each size once and
leaves no trace in later images, the server's worker runs it in its own thread before any request, /health
says "warming" (503) until then, and bad sizes are refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidInputError
from pipeline.pipeline import Pipeline
from pipeline.serve.config import ServeConfig, parse_warm_sizes
from pipeline.serve.launch import start_server
from pipeline.serve.worker import Worker

KW = {"num_inference_steps": 2, "output_type": "np"}


def _image(pipe: Pipeline, height: int, width: int) -> np.ndarray:
    return pipe("a cat", height=height, width=width, generator=torch.Generator().manual_seed(3), **KW).images


def test_warm_up_serves_each_size_and_leaves_no_trace(tiny_sd: Path, tmp_path: Path) -> None:
    kwargs = {"backend": "torch", "device": "cpu", "cache_dir": tmp_path}
    cold = Pipeline.from_pretrained(tiny_sd, **kwargs)
    expected = _image(cold, 48, 32)
    warm = Pipeline.from_pretrained(tiny_sd, **kwargs)
    spent = warm.warm_up([(32, 48), (32, 32)], num_inference_steps=2)
    assert list(spent) == ["32x48", "32x32"] and all(s > 0 for s in spent.values())
    assert warm.progress  # restored
    np.testing.assert_array_equal(_image(warm, 48, 32), expected)
    default = warm.family.default_size
    assert list(warm.warm_up(num_inference_steps=1)) == [f"{default}x{default}"]
    with pytest.raises(InvalidInputError):
        warm.warm_up([(33, 32)])  # not a multiple of the model's granularity: the call's own check


def test_the_worker_warms_up_in_its_thread_before_any_request(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    pipe.progress = False
    threads: list[str] = []
    original = pipe.warm_up

    def recorded(*args, **kwargs):
        import threading

        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    pipe.warm_up = recorded
    worker = Worker(pipe, max_queue=4, max_batch=1, batch_wait=0.0, scheduler=None, warm_sizes=((32, 32),))
    assert worker.stats()["warming"]
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while worker.stats()["warming"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = worker.stats()
        assert not stats["warming"] and list(stats["warm_up_s"]) == ["32x32"]
        assert threads == ["pipeline-worker"]
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("flags", "warmed"),
    [
        (["--warm-size", "32x32", "--warm-size", "48x32"], {"32x32", "48x32"}),
        ([], {"64x64"}),  # the tiny model's native size (what a request without `size` gets)
        (["--warm-size", "none"], set()),
        (["--max-side", "32"], set()),  # no request may ask for the native size: nothing to warm by default
    ],
    ids=["sizes", "native-by-default", "none", "native-above-max-side"],
)
def test_a_server_warms_up_before_it_says_ok(
    tiny_sd: Path, tmp_path: Path, flags: list[str], warmed: set[str]
) -> None:
    args = ["--model", str(tiny_sd), "--device", "cpu", "--backend", "torch", "--cache-dir", str(tmp_path)]
    server = start_server([*args, *flags], log_path=tmp_path / "s.log")
    try:
        health = server.health()
        assert health["status"] == "ok" and not health["warming"]
        assert set(health["warm_up_s"]) == warmed
        assert health["batches"] == 0  # the warm-up is no request
    finally:
        server.stop()


def test_a_warming_server_answers_503(tiny_sd: Path, tmp_path: Path) -> None:
    """Polled from the start: while the sizes are served /health is 503 with "warming", then 200."""
    args = ["--model", str(tiny_sd), "--device", "cpu", "--backend", "torch", "--cache-dir", str(tmp_path)]
    server = start_server([*args, "--warm-size", "256x256"], log_path=tmp_path / "s.log", wait=False)
    codes: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 200 not in codes:
            try:
                server.health()
                codes.append(200)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.02)
        assert codes[-1] == 200 and 503 in codes
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--warm-size", "512"], "must be WIDTHxHEIGHT"),
        (["--warm-size", "4096x512"], "--max-side"),
        (["--warm-size", "none", "--warm-size", "32x32"], "cannot be combined"),
    ],
)
def test_bad_warm_sizes_exit_2_with_one_line(tiny_sd: Path, flags: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.serve", "--model", str(tiny_sd), "--device", "cpu", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_warm_size_the_model_cannot_serve_stops_the_server_at_start(tiny_sd: Path) -> None:
    """Checked like a request of that size, once the model (its granularity) is known: exit 2, the error last."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.serve",
            "--model",
            str(tiny_sd),
            "--device",
            "cpu",
            "--warm-size",
            "36x32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1]
        == "error: width 36 is not a positive multiple of 8 (sd needs multiples of 8)"
    )


def test_serve_config_checks_warm_sizes() -> None:
    with pytest.raises(InvalidInputError, match="--max-side"):
        ServeConfig(model="m", warm_sizes=((0, 512),))
    assert ServeConfig(model="m").warm_sizes is None  # the model's native size, resolved once it loads
    assert parse_warm_sizes(None) is None and parse_warm_sizes(["None"]) == ()
    assert parse_warm_sizes(["512x768", "64x64"]) == ((512, 768), (64, 64))


def test_ray_serve_build_reads_warm_sizes() -> None:
    """`serve run pipeline.serve.ray_app:build warm_sizes=WxH,WxH`: parsed as --warm-size is, checked at once."""
    from pipeline.serve import ray_app

    with pytest.raises(InvalidInputError, match="cannot be combined"):
        ray_app.build({"model": "m", "warm_sizes": "512x512,none"})
    with pytest.raises(InvalidInputError, match="--max-side"):
        ray_app.build({"model": "m", "warm_sizes": "512x512,4096x512"})


def test_serve_first_requests_script_times_two_server_starts(tiny_sd: Path, tmp_path: Path) -> None:
    """scripts/serve_first_requests.py, as run on the GPU for docs/serve.md, here on the tiny model."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "serve_first_requests.py"
    out = tmp_path / "first.json"
    args = [
        "--model",
        str(tiny_sd),
        "--sizes",
        "64x64",
        "32x32",
        "--steps",
        "2",
        "--restart",
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, str(script), *args, "--", "--device", "cpu", "--backend", "torch"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert len(result["starts"]) == 2
    # the second start warms what the first one served besides its native size, before the requests
    for start, warmed in zip(result["starts"], (["64x64"], ["64x64", "32x32"]), strict=True):
        assert list(start["warm_up_s"]) == warmed and start["ready_s"] > 0
        assert [(r["size"], r["status"]) for r in start["requests"]] == [("64x64", 200), ("32x32", 200)]
        assert all(r["seconds"] > 0 for r in start["requests"])


def test_warm_up_runs_two_steps_where_one_graph_serves_the_default(tiny_sd: Path, tmp_path: Path) -> None:
    """A graphed run's buffers hold 64 steps (denoise.step_capacity) whatever the count up to 64, so a 2-step
    call leaves the graph a call at the default steps replays; where the padding does not fit (or no graph
    is padded: the CPU) the default steps are warmed."""
    from pipeline.denoise import step_capacity
    from pipeline.warming import warm_up_steps

    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    default = pipe.family.default_steps
    assert warm_up_steps(pipe, 32, 32) == default  # ungraphed: each count its own buffers
    pipe.backend.step_capacity = lambda steps, row_bytes: step_capacity(
        steps, row_bytes, 1 << 30
    )  # as on CUDA
    assert warm_up_steps(pipe, 32, 32) == 2
    pipe.backend.step_capacity = lambda steps, row_bytes: step_capacity(steps, row_bytes, 4 * row_bytes)
    assert warm_up_steps(pipe, 32, 32) == default  # too large to pad: a graph per step count


def test_served_sizes_are_counted_merged_and_bounded(tmp_path: Path, caplog) -> None:
    from pipeline.serve import sizes
    from pipeline.serve.sizes import ServedSizes, Shape

    path = tmp_path / "serve-sizes" / "m.json"
    one, two = ServedSizes(path, flush_s=3600), ServedSizes(path, flush_s=3600)  # two replicas, one cache
    for _ in range(3):
        one.record(Shape(768, 768))
    one.record(Shape(512, 512, 2))
    two.record(Shape(512, 512, 2))
    two.record(Shape(640, 640))
    assert not path.exists()  # not due yet
    one.flush()
    two.flush()
    reader = ServedSizes(path)
    assert reader.most_served(2) == [Shape(768, 768), Shape(512, 512, 2)]
    assert reader.most_served(5, {Shape(768, 768)}) == [Shape(512, 512, 2), Shape(640, 640)]
    many = ServedSizes(path)
    for i in range(sizes.KEEP + 10):
        many.record(Shape(8 * (i + 1), 8))
    many.flush()
    assert len(json.loads(path.read_text())["shapes"]) == sizes.KEEP  # the most served are kept
    assert ServedSizes(path).most_served(1) == [Shape(768, 768)]
    path.write_text("{not json")
    assert ServedSizes(path).most_served(3) == []  # unreadable: ignored, said once ...
    assert "cannot be read" in caplog.text
    again = ServedSizes(path)
    again.record(Shape(64, 64))
    again.flush()  # ... and replaced at the next save
    assert ServedSizes(path).most_served(3) == [Shape(64, 64)]


def test_a_restarted_server_warms_what_it_served_while_idle(tiny_sd: Path, tmp_path: Path) -> None:
    """Start 1 serves 32x48 twice and 48x32 (2 images) once; start 2 warms those after its native size, once
    /health says ok, and a request meanwhile is still served."""
    args = ["--model", str(tiny_sd), "--device", "cpu", "--backend", "torch", "--cache-dir", str(tmp_path)]
    server = start_server(args, log_path=tmp_path / "s1.log")
    try:
        for size, n in (("32x48", 1), ("32x48", 1), ("48x32", 2)):
            body = {"prompt": "a cat", "size": size, "steps": 2, "n": n, "response_format": "b64_json"}
            request = urllib.request.Request(
                f"{server.url}/v1/images/generations",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                assert response.status == 200
    finally:
        server.stop()
    files = list((tmp_path / "serve-sizes").glob("*.json"))
    assert len(files) == 1  # saved when the server stopped
    server = start_server([*args, "--warm-recent", "1"], log_path=tmp_path / "s2.log")
    try:
        deadline = time.monotonic() + 300
        while (health := server.health())["warming_recent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(health["warm_up_s"]) == {"64x64", "32x48"}  # native, then the most served (of 1)
        assert health["batches"] == 0
    finally:
        server.stop()
    server = start_server([*args, "--warm-recent", "0"], log_path=tmp_path / "s3.log")
    try:
        assert set(server.health()["warm_up_s"]) == {"64x64"} and server.health()["warming_recent"] == 0
    finally:
        server.stop()


def test_ray_serve_build_reads_warm_recent() -> None:
    """`warm_recent=N` reaches ServeConfig as an int, and a negative one is refused at once."""
    from pipeline.serve import ray_app

    with pytest.raises(InvalidInputError, match="--warm-recent"):
        ray_app.build({"model": "m", "warm_recent": "-1"})
