"""scripts/lora_bench.py end to end on a CPU with tiny-flux: every switch measured, the checks it makes hold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "lora_bench.py"
SWITCHES = ("load_a", "scale", "load_b", "mix", "unload")


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_lora_bench_measures_every_switch(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    command = [sys.executable, str(BENCH), "--model", "tiny-flux", "--device", "cpu", "--size", "32"]
    command += [
        "--steps",
        "2",
        "--rank",
        "4",
        "--iterations",
        "1",
        "--cache-dir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    env = dict(os.environ, ADAPTIVE_DIFFUSION_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert "steady image, LoRA A" in proc.stdout and "check nothing_recompiled_or_recaptured" in proc.stdout
    for name in (*SWITCHES, *(f"subtract_{s}" for s in SWITCHES)):
        entry = data["switches"][name]
        assert positive(entry["first_image_s"]) and entry["switch_s"] >= 0, name
    assert data["switches"]["load_a"]["layers"] > 0 and positive(data["switches"]["load_a"]["read_convert_s"])
    assert positive(data["steady_plain_s"]) and positive(data["lora_vs_plain"])
    assert data["checks"] == {"nothing_recompiled_or_recaptured": True, "unload_gives_the_plain_image": True}
    assert data["unload_max_abs_diff"] == 0.0
    assert 0 < data["subtract"]["drift"]["max_abs"] < 1e-5  # float32: one rounding, not zero
