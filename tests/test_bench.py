"""scripts/bench.py end to end on a CPU with the tiny models: every section measured, written and drawn."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
SECTIONS = ("eager", "diffusers_eager", "adaptive", "static", "cold_start", "warm_start", "shipped_start")


def run_bench(model: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    env = dict(os.environ, ADAPTIVE_DIFFUSION_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, str(BENCH), "--model", model, "--device", "cpu", "--steps", "2"]
    command += ["--height", "64", "--width", "64", "--iterations", "3", "--json", str(out_json)]
    command += ["--plot", str(out_png)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc, out_json, out_png


def positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize(
    "model",
    [
        "tiny-sd",
        pytest.param("tiny-flux", marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", marks=pytest.mark.slow),
    ],
)
def test_bench_measures_every_section(model: str, tmp_path: Path) -> None:
    proc, out_json, out_png = run_bench(model, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text())

    configs = data["configs"]
    for name in SECTIONS:
        entry = configs[name]
        assert entry["status"] == "ok", (name, entry["reason"])
        assert len(entry["calls"]) >= 3, name
        for call in entry["calls"]:
            assert positive_finite(call["seconds"]), (name, call)
            assert all(positive_finite(v) for v in call["stages"].values()), (name, call)
        assert positive_finite(entry["steady_s"]), name
    # on a CPU: no CUDA graphs, and diffusers' compile is left out unless asked for
    assert configs["adaptive_graphs"]["status"] == "skipped"
    assert "CUDA" in configs["adaptive_graphs"]["reason"]
    assert "diffusers_compiled" not in configs

    # stage laps add up to each call of our pipeline; diffusers is compared in the same run, on the same
    # weights: the same images, and a ratio for every configuration that ran
    call = configs["adaptive"]["calls"][1]
    assert set(call["stages"]) >= {"text_encoders", "denoise", "vae_decoder", "total"}
    assert configs["diffusers_eager"]["max_abs_diff"] < 1e-3
    for name in ("eager", "adaptive", "static", "cold_start", "warm_start", "shipped_start"):
        assert positive_finite(configs[name]["vs_diffusers_eager"]["steady_speedup"]), name
    assert positive_finite(configs["cold_start"]["load_s"])
    assert positive_finite(configs["warm_start"]["process_s"])

    env = data["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] and env["versions"]["diffusers"]
    assert data["reference_trt_rtx"]["seconds"]["iteration 1 (fallback)"] == 6.46

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out_png) as image:
        image.verify()
    with Image.open(out_png) as image:
        assert image.width > 300 and image.height > 200

    assert "diffusers, eager" in proc.stdout and "steady s" in proc.stdout


def test_bench_rejects_a_bad_request(tmp_path: Path) -> None:
    env = dict(os.environ, ADAPTIVE_DIFFUSION_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, str(BENCH), "--model", "tiny-sd", "--device", "cpu", "--height", "63"]
    command += ["--steps", "1", "--iterations", "1", "--configs", "eager", "--json", str(tmp_path / "b.json")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "multiple of" in proc.stderr
