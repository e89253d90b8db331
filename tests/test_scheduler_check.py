"""scripts/scheduler_check.py end to end on a CPU with the tiny SD model: both loops measured and written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scheduler_check.py"


def test_scheduler_check_measures_both_loops(tiny_sd: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--model", str(tiny_sd), "--device", "cpu", "--size", "32"]
    command += [
        "--steps",
        "2",
        "--iterations",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, ADAPTIVE_DIFFUSION_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "scheduler_check.json").read_text())
    assert data["ok"] is True
    assert data["euler"]["loop"] == "tables" and data["dpm++2m-sde"]["loop"] == "own step"
    for label in ("euler", "dpm++2m-sde"):
        assert data[label]["denoise_s"] > 0 and data[label]["host_step_ms"] > 0
    assert "dpm++2m-sde" in proc.stdout  # the table
