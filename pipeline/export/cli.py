"""`python -m export MODEL --out DIR`: ONNX of every stage (and, with --engines, TensorRT-RTX engines)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import PipelineError
from ..families import family_for
from ..loading import resolve_model
from ..options import DTYPES
from .onnx_export import DEFAULT_OPSET, export_model


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
    parser.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are made")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    engines = parser.add_argument_group("TensorRT-RTX engines (built from the exported ONNX)")
    engines.add_argument("--engines", action="store_true", help="also build TensorRT-RTX engines")
    engines.add_argument("--targets", default="sm86,sm89,sm120", help="compute capabilities to build for")
    engines.add_argument("--min-size", default="512x512", help="smallest image, WIDTHxHEIGHT")
    engines.add_argument("--opt-size", default="1024x1024", help="image size to optimize for, WIDTHxHEIGHT")
    engines.add_argument("--max-size", default="1024x1024", help="largest image, WIDTHxHEIGHT")
    engines.add_argument("--max-batch", type=int, default=1, help="most images per call")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pipeline",):  # ours at INFO (DEBUG with -v); libraries' at WARNING
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        source = resolve_model(args.model, cache_dir=args.cache_dir)
        family = family_for(source)
        if args.engines:  # every engine option is checked before the export, not after it
            from .engines import parse_targets, shape_range_from_args

            parse_targets(args.targets)
            shape_range_from_args(args, family)
        paths = export_model(
            source,
            args.out,
            stages=stages,
            dtype=DTYPES[args.dtype],
            opset=args.opset,
            force=args.force,
            device=args.device,
        )
        if args.engines:
            from .engines import build_engines_from_args

            build_engines_from_args(args, family, args.out)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stage, path in paths.items():
        print(f"{stage}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
