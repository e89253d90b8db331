"""scripts/bench.py: the first image of new processes (cold, warm, shipped cache), each in a subprocess of its own."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_results import (
    LABELS,
    OURS,
    START_CONFIGS,
    Call,
    ConfigResult,
    Setup,
    Status,
    call_ours,
    finish,
    peak_memory_gib,
    reset_peak_memory,
    settle_background,
    skipped,
    timed,
)

from pipeline import InvalidInputError

logger = logging.getLogger("bench")
PROFILE_ENV = "BENCH_PROFILE_FIRST_CALL"  # set: each new process writes a cProfile of its first call


def measure_start(setup: Setup, argv_common: list[str]) -> list[ConfigResult]:
    """Cold, warm and shipped start, each in its own process: the first with an empty cache folder, the
    second with the folder the first one saved, the third with an empty user folder and the first one's cache
    shipped as prewarm.py ships it (caches/ + manifest). Inductor and triton get an empty folder in each, so
    only the project's persisted cache can help."""
    name = "adaptive_graphs" if setup.device.type == "cuda" else "adaptive"
    options = OURS[name].options(setup.compile_on, setup.precision)
    cache_dir = setup.config_dir("start") / "cache"
    results = [run_first_image_process(setup, "cold_start", options, cache_dir, argv_common)]
    if not results[0].ok:
        return [*results, *(skipped(n, "the cold-start process did not complete") for n in START_CONFIGS[1:])]
    shipped = ship_cache(cache_dir, setup.config_dir("shipped"))
    results.append(run_first_image_process(setup, "warm_start", options, cache_dir, argv_common))
    user_dir = setup.config_dir("shipped_start") / "cache"
    results.append(
        run_first_image_process(setup, "shipped_start", options, user_dir, argv_common, shipped_dir=shipped)
    )
    return results


def ship_cache(cache_dir: Path, shipped_dir: Path) -> Path:
    """Put the cache a process saved under `cache_dir` into a shipped-caches folder with its manifest entry,
    as scripts/prewarm.py does."""
    from pipeline.cache import SHIPPED_FILE, ShippedCache, atomic_write_bytes, sha256_file, update_manifest

    for cache in cache_dir.glob("*/runtime/*.cache"):
        model_key, platform_key = cache.parents[1].name, cache.stem
        target = shipped_dir / model_key / platform_key / SHIPPED_FILE
        atomic_write_bytes(target, cache.read_bytes())
        entry = ShippedCache(
            model_id=model_key.rsplit("-", 1)[0],
            model_hash=model_key.rsplit("-", 1)[1],
            model_key=model_key,
            platform_key=platform_key,
            backend=platform_key.split("-", 1)[0],
            precision="",
            files={SHIPPED_FILE: {"sha256": sha256_file(target), "size": target.stat().st_size}},
        )
        update_manifest(shipped_dir, entry)
    return shipped_dir


def run_first_image_process(
    setup: Setup,
    which: str,
    options: dict[str, Any],
    cache_dir: Path,
    argv_common: list[str],
    shipped_dir: Path | None = None,
) -> ConfigResult:
    folder = setup.config_dir(which)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "result.json"
    env = dict(os.environ)
    env["ADAPTIVE_DIFFUSION_SHIPPED_CACHES"] = str(shipped_dir or folder / "no-shipped-caches")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    env["TRITON_CACHE_DIR"] = str(folder / "triton")
    command = [
        sys.executable,
        str(Path(__file__).resolve().with_name("bench.py")),  # its --worker mode
        *argv_common,
        "--cache-dir",
        str(cache_dir),
        "--worker-options",
        json.dumps(options),
        "--worker-out",
        str(out),
        "--worker-name",
        which,
    ]
    logger.info("%s: running the first image in a new process", which)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        status = Status.SKIPPED if proc.returncode == 2 else Status.FAILED
        logger.error("%s: process exited %d: %s", which, proc.returncode, " | ".join(tail))
        return ConfigResult(which, LABELS[which], status, f"exit {proc.returncode}: {' | '.join(tail)}")
    data = json.loads(out.read_text())
    data["calls"] = [Call(**c) for c in data["calls"]]
    result = ConfigResult(**data)
    result.process_s = process_s
    result.cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return result


def first_image_worker(setup: Setup, options: dict[str, Any], cache_dir: Path, out: Path, name: str) -> int:
    """Inside the subprocess: load, K calls, close (saves the cache); the result as JSON in `out`."""
    baseline = reset_peak_memory(setup.device)
    try:
        pipe, load_s = setup.load(options, cache_dir)
    except InvalidInputError as e:
        print(f"error: backend rejected the options: {e}", file=sys.stderr)
        return 2
    result = ConfigResult(name, LABELS[name], options=options, backend=pipe.backend.describe(), load_s=load_s)
    result.backend_stats = (
        {"loaded_before_first_call": asdict(pipe.backend.stats)} if hasattr(pipe.backend, "stats") else {}
    )
    for i in range(setup.iterations):
        if i == 0 and os.environ.get(PROFILE_ENV):  # where a new process's first call spends its host time
            call = _profiled_call(pipe, setup, out.with_name("first_call_profile.txt"))
        else:
            call, _ = call_ours(pipe, setup.request)
        result.calls.append(call)
        if i == 0:  # the cold process leaves the warm one its background-compiled regions too
            result.background_s, result.recapture_s = settle_background(pipe, setup)
    result.peak_memory_gib = peak_memory_gib(setup.device, baseline)
    result.cache_save_s, _ = timed(lambda: finish(pipe, result), setup.device)
    out.write_text(json.dumps(asdict(result)))
    return 0


def _profiled_call(pipe: Any, setup: Setup, path: Path) -> Call:
    """The first call under cProfile; the 40 costliest functions by cumulative time go to `path`."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        call, _ = call_ours(pipe, setup.request)
    finally:
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    path.write_text(text.getvalue())
    return call
