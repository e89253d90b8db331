"""scripts/prewarm.py on a CPU: the torch backend compiles there (its default is eager on a CPU), so a cache
is made, listed in the manifest, and found by a fresh user's pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import SHIPPED_FILE, ModelCache, resolve_runtime_cache, sha256_file
from pipeline.loading import read_model

PREWARM = Path(__file__).resolve().parents[1] / "scripts" / "prewarm.py"


@pytest.mark.slow  # torch.compile of the tiny UNet on a CPU
def test_prewarm_on_cpu_ships_a_cache_a_fresh_user_starts_from(tiny_sd: Path, tmp_path: Path) -> None:
    out = tmp_path / "caches"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    command = [sys.executable, str(PREWARM), str(tiny_sd), "--sizes", "32x32", "--steps", "1"]
    command += ["--device", "cpu", "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (entry,) = json.loads((out / "manifest.json").read_text())
    assert entry["backend"] == "torch" and entry["shapes"] == [{"batch": 1, "height": 32, "width": 32}]
    shipped = out / entry["model_key"] / entry["platform_key"] / SHIPPED_FILE
    assert entry["files"][SHIPPED_FILE]["sha256"] == sha256_file(shipped)

    user = ModelCache.for_model(read_model(tiny_sd), "torch", "cpu", tmp_path / "user")
    assert resolve_runtime_cache(user, shipped_dir=out) == user.runtime_cache_path
