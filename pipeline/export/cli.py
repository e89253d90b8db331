"""`python -m export MODEL --out DIR`: ONNX of every stage (and, with --engines, TensorRT-RTX engines)."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import PipelineError
from ..families import family_for
from ..loading import resolve_model
from ..options import DTYPES, parse_size
from .onnx_export import DEFAULT_OPSET, Fp8Export, export_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export each stage of a FLUX.1 or Stable Diffusion model to ONNX (one file per stage "
        "plus manifest.json); stages already exported with the same model, dtype and versions are skipped.",
    )
    parser.add_argument(
        "model", help="diffusers folder, Hugging Face hub id, or a built-in name (tiny-flux, ...)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--stages", help="comma-separated stages (default: all of the model's stages)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)"
    )
    parser.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model is built and traced: cpu (default) or cuda, which needs GPU memory for the "
        "weights (FLUX.1-dev in bf16: 24 GB)",
    )
    parser.add_argument("--force", action="store_true", help="re-export even where the manifest matches")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are made")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    engines = parser.add_argument_group("TensorRT-RTX engines (built from the exported ONNX)")
    engines.add_argument("--engines", action="store_true", help="also build TensorRT-RTX engines")
    engines.add_argument(
        "--targets",
        default=None,
        help="compute capabilities to build for (default sm86,sm89,sm120; fp8: sm89,sm120)",
    )
    engines.add_argument("--min-size", default="512x512", help="smallest image, WIDTHxHEIGHT")
    engines.add_argument("--opt-size", default="1024x1024", help="image size to optimize for, WIDTHxHEIGHT")
    engines.add_argument("--max-size", default="1024x1024", help="largest image, WIDTHxHEIGHT")
    engines.add_argument("--max-batch", type=int, default=1, help="most images per call")
    engines.add_argument(
        "--precision",
        choices=("fp8",),
        default=None,
        help="fp8: the denoiser as FP8 Q/DQ (Model Optimizer calibration where installed, else weight-only); "
        "engines then default to --targets sm89,sm120",
    )
    engines.add_argument(
        "--fp8-method",
        choices=("modelopt", "weight-only"),
        default=None,
        help="how fp8 is made (default: modelopt if installed)",
    )
    engines.add_argument(
        "--calibration-size",
        default=None,
        help="fp8 calibration image size, WIDTHxHEIGHT (default: the model's)",
    )
    engines.add_argument(
        "--weight-streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build engines that can stream weights from host memory (default on; no cost when they fit)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pipeline",):  # ours at INFO (DEBUG with -v); libraries' at WARNING
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    start = time.perf_counter()
    try:
        source = resolve_model(args.model, cache_dir=args.cache_dir)
        family = family_for(source)
        if args.engines:  # every engine option is checked before the export, not after it
            from ..engines.rtx import require_trt
            from .engine_args import shape_range_from_args

            require_trt()
            from .engine_meta import parse_targets

            if args.targets:
                parse_targets(args.targets)
            shape_range_from_args(args, family)
        fp8 = None
        if args.precision == "fp8":
            from .engine_meta import check_precision_targets, parse_targets
            from .fp8 import choose_method

            if args.targets:  # refuse sm86 & co before a long export
                check_precision_targets("fp8", parse_targets(args.targets))
            size = None
            if args.calibration_size:
                width, height = parse_size(args.calibration_size)
                size = (height, width)
            fp8 = Fp8Export(choose_method(args.fp8_method), calibration_size=size)
        paths = export_model(
            source,
            args.out,
            stages=stages,
            dtype=DTYPES[args.dtype],
            opset=args.opset,
            force=args.force,
            device=args.device,
            fp8=fp8,
            progress=not args.quiet,
        )
        engines = {}
        if args.engines:
            from .engine_args import build_engines_from_args

            args.progress = not args.quiet
            engines = build_engines_from_args(args, family, args.out)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stage, path in paths.items():
        print(f"{stage}: {path}")
    if not args.quiet:  # what it cost, on stderr: stdout stays one line per stage
        sizes = ", ".join(f"{stage} {_size(path)}" for stage, path in paths.items())
        print(f"onnx: {sizes}", file=sys.stderr)
        if engines:
            from .engine_args import engine_summary

            print(engine_summary(engines), file=sys.stderr)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"done in {time.perf_counter() - start:.1f} s, peak RAM {peak:.1f} GB", file=sys.stderr)
    return 0


def _size(onnx_path: Path) -> str:
    data = onnx_path.with_name(onnx_path.name + ".data")
    total = onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return f"{total / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
