"""`python -m pipeline --build-engines --model M`: the rtx backend's engines, built as a visible step.

Export (one progress bar over the stages) then engine builds (one bar, with TensorRT-RTX's build phase), into
the model's cache folder for this machine's GPU; then a table of each engine's precision, sizes and build
time, and the memory plan for 16, 24 and 32 GB cards. `from_pretrained(backend="rtx")` loads what this built.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import ModelCache
from ..export.engine_args import engine_summary
from ..export.engine_meta import parse_targets
from ..families import ShapeRange, family_for
from ..loading import resolve_model
from ..options import parse_device, parse_dtype, parse_size
from .base import Precision
from .rtx_backend import EngineSet, default_shape_range, engine_precision


def build_engines_command(args: argparse.Namespace) -> int:
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    family = family_for(source)
    device = parse_device(args.device)
    # engines are for a GPU: the family's GPU dtype unless asked, also when building on a CPU
    dtype = parse_dtype(args.dtype, torch.device("cuda"), family)
    precision = engine_precision(args.precision, dtype)
    targets = None
    if args.targets:
        targets = parse_targets(args.targets)
    elif device.type == "cuda":
        targets = ("current",)
    shape_range = default_shape_range(family)
    if args.max_size:
        width, height = parse_size(args.max_size)
        lo = tuple(min(a, b) for a, b in zip(shape_range.min_size, (height, width), strict=True))
        opt = tuple(min(a, b) for a, b in zip(shape_range.opt_size, (height, width), strict=True))
        shape_range = ShapeRange(lo, opt, (height, width), 1, 1, shape_range.max_batch)  # type: ignore[arg-type]
    model_cache = ModelCache.for_model(source, "rtx", device, args.cache_dir)
    engines = EngineSet(family, model_cache, dtype, precision)
    start = time.perf_counter()
    export_device = parse_device(args.export_device) if args.export_device else device
    paths = engines.build(
        device=export_device,
        targets=targets,
        shape_range=shape_range,
        progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(engine_summary(paths))
        plan = engines.plan({name: _meta(path) for name, path in paths.items()})
        print("memory plan:")
        for line in plan.lines():
            print(f"  {line}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        kind = "fp8 denoiser" if precision is Precision.FP8 else engines.tag
        print(
            f"built {len(paths)} {kind} engines in {elapsed:.1f} s (peak RAM {peak:.1f} GB) -> {engines.engine_dir}"
        )
    return 0


def _meta(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())
