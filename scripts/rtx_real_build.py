"""Build a real-size FP8 TensorRT-RTX engine set (FLUX.1-dev architecture, random weights) and report on it.

Resumable: every step writes under --out and is skipped when its output is already there (the ONNX manifest
and each engine's metadata decide), so the work can be split over several commands of a few minutes each.
Each command appends what it did to OUT/report.json; --step plan prints the table.

    # on the GPU machine (TensorRT-RTX builds for the named targets without running there):
    python scripts/rtx_real_build.py --out /data/flux-fp8 --step export --stages text_encoder,vae_decoder,text_encoder_2
    python scripts/rtx_real_build.py --out /data/flux-fp8 --step export --stages transformer
    python scripts/rtx_real_build.py --out /data/flux-fp8 --step engines --stages text_encoder,vae_decoder,text_encoder_2
    python scripts/rtx_real_build.py --out /data/flux-fp8 --step engines --stages transformer
    python scripts/rtx_real_build.py --out /data/flux-fp8 --step plan

    # here, on the CPU, at real widths with fewer blocks:
    python scripts/rtx_real_build.py --out /tmp/flux-1-1 --layers 1,1 --device cpu --step all

The transformer is written as FP8 Q/DQ (Model Optimizer, calibrated through the torch modules on --device;
weight-only without it), the other stages in --dtype (bf16). Engines are strongly typed, for --targets
(SM89, SM120), with weight streaming. The plan step reports ONNX and engine sizes, build times, peak RAM of
each command, and the memory plan for 16, 24 and 32 GB cards (pipeline/engines/memory.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from export_real import fewer_layers, peak_rss_gb

from pipeline.engines.memory import GB, MemoryPlan
from pipeline.export import export_model, read_manifest
from pipeline.export.engine_meta import parse_targets
from pipeline.export.engines import build_engines
from pipeline.export.fp8 import choose_method
from pipeline.export.onnx_export import Fp8Export, library_versions
from pipeline.families import ShapeRange, family_for
from pipeline.loading import resolve_model
from pipeline.options import DTYPES, parse_size

logger = logging.getLogger("rtx_real_build")
CARDS_GB = (16, 24, 32)


def _report(out: Path) -> dict[str, Any]:
    path = out / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def _save(out: Path, report: dict[str, Any]) -> None:
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "report.json")


def _onnx_bytes(onnx_dir: Path, stage: str) -> int:
    files = [onnx_dir / f"{stage}.onnx", onnx_dir / f"{stage}.onnx.data"]
    return sum(f.stat().st_size for f in files if f.is_file())


def step_export(args: argparse.Namespace, source: Any, family: Any, out: Path, report: dict) -> None:
    fp8 = Fp8Export(choose_method(args.fp8_method), calibration_size=args.calibration_size)
    for stage in args.stages or list(family.stages):
        start = time.perf_counter()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        export_model(
            source, out / "onnx", stages=[stage], dtype=DTYPES[args.dtype], device=args.device, fp8=fp8
        )
        entry = read_manifest(out / "onnx")[stage]
        facts = {
            "precision": entry["precision"],
            "fp8_method": entry.get("fp8_method"),
            "onnx_bytes": _onnx_bytes(out / "onnx", stage),
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gb_of_command": round(peak_rss_gb(), 2),
        }
        if args.device.startswith("cuda"):
            facts["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        report["steps"][f"export:{stage}"] = {**report["steps"].get(f"export:{stage}", {}), **facts}
        _save(out, report)
        logger.info("export %s: %s", stage, facts)


def step_engines(args: argparse.Namespace, family: Any, out: Path, report: dict) -> None:
    g = family.granularity
    lo = max(g, 512 // g * g)
    shape_range = ShapeRange((lo, lo), (1024, 1024), (1024, 1024), 1, 1, 1)
    for stage in args.stages or list(family.stages):
        start = time.perf_counter()
        (path,) = build_engines(
            family,
            out / "onnx",
            out / "engines",
            stages=[stage],
            targets=args.targets,
            shape_range=shape_range,
        ).values()
        meta = json.loads(path.with_suffix(".json").read_text())
        facts = {
            "engine_bytes": meta["engine_bytes"],
            "weight_bytes": meta["weight_bytes"],
            "activation_bytes": meta["activation_bytes"],
            "build_s": meta.get("build_seconds"),
            "wall_s": round(time.perf_counter() - start, 1),
            "targets": meta["targets"],
            "peak_rss_gb_of_command": round(peak_rss_gb(), 2),
        }
        report["steps"][f"engine:{stage}"] = facts
        _save(out, report)
        logger.info("engine %s: %s", stage, facts)


def merge_reports(out: Path, report: dict, others: list[Path]) -> list[Path]:
    """Fold the steps of other output folders (stages exported and built in parallel, one folder each) into
    `report`; the folders whose engines the plan then reads, this one first."""
    for other in others:
        for key, facts in _report(other)["steps"].items():
            report["steps"].setdefault(key, facts)
    return [out, *others]


def step_plan(family: Any, folders: list[Path], report: dict) -> None:
    metadata = {}
    for stage in family.stages:
        for folder in folders:
            meta_file = folder / "engines" / f"{stage}.json"
            if meta_file.is_file():
                metadata[stage] = json.loads(meta_file.read_text())
                break
    missing = [s for s in family.stages if s not in metadata]
    if family.denoiser in missing:
        raise SystemExit(f"no {family.denoiser} engine under {folders[0]} yet: run --step engines first")
    plan = MemoryPlan.from_metadata(metadata, family.denoiser, model=report.get("model", "model"))
    report["plan"] = {
        "stages_missing": missing,
        "activation_bytes": plan.activation_bytes,
        "cards": {f"{gb} GB": plan.summary(int(gb * GB)) for gb in CARDS_GB},
        "lines": plan.lines(CARDS_GB),
    }
    _save(folders[0], report)


def print_table(family: Any, report: dict) -> None:
    print(f"{report.get('model')}  ({report.get('date')}, {report.get('machine')})")
    print(f"{'stage':<16}{'precision':<11}{'onnx GB':>9}{'engine GB':>11}{'act GB':>8}{'export s':>10}{'build s':>9}"
          f"{'peak RAM GB':>13}")  # fmt: skip
    for stage in family.stages:
        e = report["steps"].get(f"export:{stage}", {})
        b = report["steps"].get(f"engine:{stage}", {})
        ram = max(e.get("peak_rss_gb_of_command", 0), b.get("peak_rss_gb_of_command", 0))
        print(
            f"{stage:<16}{e.get('precision', '-'):<11}{e.get('onnx_bytes', 0) / 1e9:>9.2f}"
            f"{b.get('engine_bytes', 0) / 1e9:>11.2f}{b.get('activation_bytes', 0) / 1e9:>8.2f}"
            f"{e.get('wall_s', 0):>10.1f}{b.get('build_s') or 0:>9.1f}{ram:>13.1f}"
        )
    for card, line in report.get("plan", {}).get("cards", {}).items():
        print(f"{card} card: {line}")
    missing = report.get("plan", {}).get("stages_missing")
    if missing:
        print(f"(plan without {', '.join(missing)}: not built yet)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where ONNX, engines and report.json go")
    parser.add_argument("--model", default="flux-dev", help="a built-in architecture (default flux-dev)")
    parser.add_argument("--layers", default=None, help="FLUX: DOUBLE,SINGLE blocks instead of 19,38")
    parser.add_argument("--step", choices=("export", "engines", "plan", "all"), default="all")
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where modules are built, calibrated and traced")  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--targets", default="sm89,sm120")
    parser.add_argument("--fp8-method", choices=("modelopt", "weight-only"), default=None)
    parser.add_argument("--calibration-size", default=None, help="WIDTHxHEIGHT (default: the model's size)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/rtx-real-build"))
    parser.add_argument("--merge", default="", help="plan: comma-separated --out folders of stages run "
                        "in parallel elsewhere, whose reports and engines join this one's")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("pipeline", "rtx_real_build"):
        logging.getLogger(name).setLevel(logging.INFO)
    args.stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    args.targets = parse_targets(args.targets)
    args.merge = [Path(m) for m in args.merge.split(",") if m]
    if args.calibration_size:
        width, height = parse_size(args.calibration_size)
        args.calibration_size = (height, width)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    if args.layers:
        source = fewer_layers(source, args.layers, args.cache_dir)
    family = family_for(source)
    report = _report(out)
    report.update(
        model=source.model_id,
        date=date.today().isoformat(),
        machine=f"{platform.node()}, {len(os.sched_getaffinity(0))} cpus"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        versions=library_versions()
        | {"tensorrt_rtx": _version("tensorrt_rtx"), "modelopt": _version("nvidia-modelopt")},
    )
    if args.step in ("export", "all"):
        step_export(args, source, family, out, report)
    if args.step in ("engines", "all"):
        step_engines(args, family, out, report)
    if args.step in ("plan", "all"):
        step_plan(family, merge_reports(out, report, args.merge), report)
        print_table(family, report)
    _save(out, report)
    print(json.dumps({"step": args.step, "stages": args.stages, "peak_rss_gb": round(peak_rss_gb(), 2)}))
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
