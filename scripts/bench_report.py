"""scripts/bench.py: the report (environment, ratios against diffusers, the table, the chart)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_results import GIB, START_CONFIGS, ConfigResult, Setup

logger = logging.getLogger("bench")

# Published by NVIDIA for TensorRT-RTX adaptive inference; a reference for the chart's shape, not our data.
TRT_RTX_REFERENCE = {
    "source": "TensorRT-RTX adaptive inference, as published by NVIDIA",
    "model": "FLUX.1-dev, FP8, 512x512",
    "gpu": "GeForce RTX 5090",
    "seconds": {
        "iteration 1 (fallback)": 6.46,
        "static": 3.64,
        "iteration 2": 3.15,
        "iteration 3": 2.94,
        "iteration 3 + CUDA graphs + runtime cache": 2.76,
    },
    "jit_seconds": {"without runtime cache": 31.92, "with runtime cache": 1.95},
    "note": "reference only: not measured by this script",
}

# ---- the report -----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    def version(*dists: str) -> str | None:
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                return metadata.version(dist)
        return None

    env: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "capability": None,
        "cuda": torch.version.cuda,
        "versions": {
            "torch": torch.__version__,
            "triton": version("triton", "pytorch-triton"),
            "diffusers": version("diffusers"),
            "transformers": version("transformers"),
            "tensorrt_rtx": version("tensorrt-rtx", "tensorrt_rtx"),
            "numpy": np.__version__,
            "adaptive-diffusion": version("adaptive-diffusion"),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["device_memory_gib"] = round(props.total_memory / GIB, 1)
    return env


def by_name(results: list[ConfigResult]) -> dict[str, ConfigResult]:
    return {r.name: r for r in results}


def summary(results: list[ConfigResult]) -> dict[str, float | None]:
    """The ratios the issues ask about, from this run only."""
    r = by_name(results)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 and math.isfinite(a / b) else None

    def steady(name: str) -> float | None:
        return r[name].steady_s if name in r and r[name].ok else None

    def first(name: str) -> float | None:
        return r[name].first_s if name in r and r[name].ok else None

    def overhead(name: str) -> float | None:
        return r[name].warmup_overhead_s if name in r and r[name].ok else None

    out: dict[str, float | None] = {
        "cuda_graphs_speedup": ratio(steady("adaptive"), steady("adaptive_graphs")),
        "iteration1_over_steady_adaptive": ratio(first("adaptive"), steady("adaptive")),
        "static_over_adaptive_steady": ratio(steady("static"), steady("adaptive")),
        "static_graphs_over_adaptive_graphs_steady": ratio(
            steady("static_graphs"), steady("adaptive_graphs")
        ),
        "warm_over_cold_warmup_overhead": ratio(overhead("warm_start"), overhead("cold_start")),
        "warm_over_cold_first_call": ratio(first("warm_start"), first("cold_start")),
        "warm_start_overhead_s": overhead("warm_start"),
        "shipped_start_overhead_s": overhead("shipped_start"),
        "cold_start_first_call_s": first("cold_start"),
        "fp8_torchao_over_scaled_mm_steady": ratio(steady("fp8_torchao"), steady("fp8_scaled_mm")),
    }
    for name in ("adaptive", "adaptive_graphs", "graphs_background"):
        if name in r and len(r[name].new_size_calls) == 2:
            first_new, second_new = (c.seconds for c in r[name].new_size_calls)
            out[f"new_size_first_over_second_{name}"] = ratio(first_new, second_new)
    return out


def vs_diffusers(result: ConfigResult, base: ConfigResult | None) -> dict[str, float | None]:
    """Speed-ups (diffusers' seconds / ours) and memory ratio against a diffusers configuration, same run."""
    if base is None or not base.ok or not result.ok:
        return {}
    out: dict[str, float | None] = {
        "steady_speedup": base.steady_s / result.steady_s if result.steady_s else None,  # type: ignore[operator]
        "first_call_speedup": base.first_s / result.first_s if result.first_s else None,  # type: ignore[operator]
    }
    if result.peak_memory_gib and base.peak_memory_gib:
        out["peak_memory_ratio"] = result.peak_memory_gib / base.peak_memory_gib
    return out


def report(setup: Setup, model: str, env: dict[str, Any], results: list[ConfigResult]) -> dict[str, Any]:
    base = by_name(results).get("diffusers_eager")
    compiled = by_name(results).get("diffusers_compiled")
    configs = {}
    for result in results:
        entry = asdict(result)
        entry["first_s"] = result.first_s
        entry["steady_s"] = result.steady_s
        entry["warmup_overhead_s"] = result.warmup_overhead_s
        entry["vs_diffusers_eager"] = vs_diffusers(result, base)
        entry["vs_diffusers_compiled"] = vs_diffusers(result, compiled)
        configs[result.name] = entry
    return {
        "model": model,
        "request": asdict(setup.request),
        "settings": {
            "backend": setup.backend,
            "dtype": setup.dtype,
            "iterations": setup.iterations,
            "compile": setup.compile_on,
            "precision": setup.precision,
            "new_size": list(setup.new_size) if setup.new_size else None,
            "timing": "wall seconds between device synchronizations; steady = median of calls 2..K",
            "compile_caches": "empty inductor/triton/project cache folders per configuration and per process",
        },
        "environment": env,
        "configs": configs,
        "summary": summary(results),
        "reference_trt_rtx": TRT_RTX_REFERENCE,
    }


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(data: dict[str, Any], results: list[ConfigResult]) -> str:
    req, env = data["request"], data["environment"]
    lines = [
        f"{data['model']}  {req['width']}x{req['height']}  {req['steps']} steps  guidance {req['guidance']}  "
        f"on {env['device_name']} ({env['device']})  torch {env['versions']['torch']}  "
        f"diffusers {env['versions']['diffusers']}  {env['date']}",
        "",
        f"{'configuration':<36} {'first s':>9} {'steady s':>9} {'vs eager':>9} {'vs compiled':>11} "
        f"{'peak GiB':>9} {'serving':>8}  notes   (vs: diffusers' steady seconds / ours, same run)",
    ]
    for result in results:
        ratios = data["configs"][result.name]["vs_diffusers_eager"]
        against_compiled = data["configs"][result.name]["vs_diffusers_compiled"]
        if result.ok:
            note = ", ".join(f"{k}={v}" for k, v in result.options.items())
            if result.max_abs_diff is not None:
                note += f"; max|Δ| vs ours eager {result.max_abs_diff:.2g}"
            if result.latent_rel_l2 is not None:
                note += f"; latents rel L2 {result.latent_rel_l2:.2g}"
        else:
            note = f"{result.status}: {result.reason}"
        lines.append(
            f"{result.label:<36} {fmt(result.first_s):>9} {fmt(result.steady_s):>9} "
            f"{fmt(ratios.get('steady_speedup'), '.2f', 'x'):>9} "
            f"{fmt(against_compiled.get('steady_speedup'), '.2f', 'x'):>11} "
            f"{fmt(result.peak_memory_gib, '.2f'):>9} {fmt(result.serving_peak_gib, '.2f'):>8}  {note}"
        )
    lines += ["", "per call (seconds): total = text encoders + denoise + VAE decoder"]
    for result in results:
        for i, call in enumerate(result.calls, 1):
            parts = " + ".join(fmt(call.stages.get(s)) for s in ("text_encoders", "denoise", "vae_decoder"))
            stages = f" = {parts}" if call.stages else ""
            lines.append(f"  {result.name:<20} call {i}: {call.seconds:8.3f}{stages}")
        for i, call in enumerate(result.new_size_calls, 1):
            lines.append(f"  {result.name:<20} new size call {i}: {call.seconds:8.3f}")
        if result.background_s is not None:
            lines.append(
                f"  {result.name:<20} background compiles {result.background_s:.1f} s after call 1, "
                f"then the call swapping them in {fmt(result.recapture_s)} s (not in the calls above)"
                + (
                    f"; at the new size {result.new_size_background_s:.1f} s"
                    if result.new_size_background_s
                    else ""
                )
            )
    r = by_name(results)
    if "cold_start" in r:
        lines += ["", "start in a new process (load = from_pretrained, overhead = first call - steady)"]
        for name in START_CONFIGS:
            if name in r and r[name].ok:
                x = r[name]
                lines.append(
                    f"  {x.label:<28} process {fmt(x.process_s, '.2f')} s  load {fmt(x.load_s, '.2f')} s  "
                    f"first call {fmt(x.first_s)} s  steady {fmt(x.steady_s)} s  "
                    f"overhead {fmt(x.warmup_overhead_s)} s  cache {x.cache_bytes or 0} bytes"
                )
    lines += ["", "summary: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in data["summary"].items())]
    return "\n".join(lines)


def chart_bars(results: list[ConfigResult], iterations: int) -> list[tuple[str, float, str]]:
    """(label, seconds, group) in the order of TensorRT-RTX's adaptive-inference chart, then diffusers."""
    r = {k: v for k, v in by_name(results).items() if v.ok}
    bars: list[tuple[str, float, str]] = []
    if "adaptive" in r:
        bars.append(("iteration 1\n(fallback/compile)", r["adaptive"].calls[0].seconds, "ours"))
    if "static" in r:
        bars.append(("static", r["static"].steady_s or 0.0, "ours"))
    if "adaptive" in r:
        for i, call in enumerate(r["adaptive"].calls[1:], 2):
            bars.append((f"iteration {i}", call.seconds, "ours"))
    final = r.get("warm_start")
    if final is not None and final.options.get("cuda_graphs"):
        bars.append((f"iteration {iterations}\n+ CUDA graphs + cache", final.calls[-1].seconds, "ours"))
    elif "adaptive_graphs" in r:
        bars.append(
            (f"iteration {iterations}\n+ CUDA graphs", r["adaptive_graphs"].calls[-1].seconds, "ours")
        )
    elif final is not None:
        bars.append((f"iteration {iterations}\n+ cache (new process)", final.calls[-1].seconds, "ours"))
    for name, text in (
        ("diffusers_eager", "diffusers\neager"),
        ("diffusers_compiled", "diffusers\ncompiled"),
    ):
        if name in r:
            bars.append((text, r[name].steady_s or 0.0, "diffusers"))
    return bars


def write_chart(data: dict[str, Any], results: list[ConfigResult], path: Path, iterations: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no chart written (pip install matplotlib)")
        return False
    bars = chart_bars(results, iterations)
    colors = {"ours": "#76b900", "diffusers": "#8c8c8c"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars)), 4.8), dpi=120)
    xs = range(len(bars))
    drawn = ax.bar(xs, [b[1] for b in bars], color=[colors[b[2]] for b in bars], width=0.65)
    ax.bar_label(drawn, labels=[f"{b[1]:.2f} s" for b in bars], padding=3, fontsize=9)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per image")
    ax.margins(y=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    req, env = data["request"], data["environment"]
    ax.set_title(
        f"{data['model']}  {req['width']}x{req['height']}, {req['steps']} steps, "
        f"{env['device_name']}\nadaptive inference (green) vs diffusers (grey)",
        fontsize=10,
    )
    fig.text(
        0.01,
        0.01,
        f"torch {env['versions']['torch']}, diffusers {env['versions']['diffusers']}, {env['date']}",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
