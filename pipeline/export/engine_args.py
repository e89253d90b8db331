"""Engine builds from command-line arguments (`python -m export --engines`, `python -m pipeline
--build-engines`): size flags to a ShapeRange, where an engine set goes, and the table of what was built."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..cache import read_json_object
from ..engines.rtx import trt
from ..errors import InvalidInputError
from ..families import Family, ShapeRange
from ..options import parse_size
from .engine_meta import default_targets, parse_targets
from .engines import build_engines


def engine_dir_name(targets: Sequence[str]) -> str:
    """Folder name of an engine set: TensorRT-RTX version and targets, e.g. rtx-1.7.1.116-sm86-sm89-sm120."""
    return "-".join(("rtx", trt.__version__, *parse_targets(targets)))


def _size(value: str | None) -> tuple[int, int] | None:
    """A size flag (WIDTHxHEIGHT) -> (height, width), as ShapeRange holds sizes; None when unset."""
    if value is None:
        return None
    width, height = parse_size(value)
    return height, width


def shape_range_from_args(args: argparse.Namespace, family: Family) -> ShapeRange:
    """--min-size/--opt-size/--max-size/--max-batch -> ShapeRange; unset sizes default to the model's size."""
    d = family.default_size
    lo = _size(getattr(args, "min_size", None)) or (d, d)
    hi = _size(getattr(args, "max_size", None)) or (max(lo[0], d), max(lo[1], d))
    opt = _size(getattr(args, "opt_size", None)) or (min(max(d, lo[0]), hi[0]), min(max(d, lo[1]), hi[1]))
    g = family.granularity
    for size in (lo, opt, hi):
        if size[0] % g or size[1] % g:
            raise InvalidInputError(
                f"size {size[1]}x{size[0]} (WIDTHxHEIGHT) must be a multiple of {g} for {family.name}"
            )
    max_batch = int(getattr(args, "max_batch", None) or 1)
    try:
        return ShapeRange(lo, opt, hi, 1, 1, max_batch)
    except ValueError as e:
        raise InvalidInputError(f"engine size range: {e}") from None


def build_engines_from_args(args: argparse.Namespace, family: Family, out_dir: str | Path) -> dict[str, Path]:
    """The CLI's `--engines`: ONNX from `out_dir/<stage>.onnx`, engines to `out_dir/engines/<set>/`.

    `<set>` is `engine_dir_name(targets)` (TensorRT-RTX version + targets), so engines for different targets
    or library versions live side by side. Reads --targets, --min-size/--opt-size/--max-size, --max-batch,
    and --weight-streaming / --force / --stages / --precision where the CLI defines them.
    """
    precision = getattr(args, "precision", None)
    targets = parse_targets(getattr(args, "targets", None) or default_targets(precision))
    stages = getattr(args, "stages", None)
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    return build_engines(
        family,
        out_dir,
        Path(out_dir) / "engines" / engine_dir_name(targets),
        stages=stages,
        targets=targets,
        shape_range=shape_range_from_args(args, family),
        weight_streaming=bool(getattr(args, "weight_streaming", True)),
        force=bool(getattr(args, "force", False)),
        progress=bool(getattr(args, "progress", False)),
    )


def engine_summary(paths: Mapping[str, Path]) -> str:
    """A table of built engines from their metadata: precision, sizes, activations, build time."""
    rows = [("stage", "precision", "engine MB", "weights MB", "activations MB", "streams", "build s")]
    for name, path in paths.items():
        meta = read_json_object(path.with_suffix(".json")) or {}
        rows.append(
            (
                name,
                str(meta.get("precision", "?")),
                f"{meta.get('engine_bytes', 0) / 1e6:.1f}",
                f"{meta.get('weight_bytes', 0) / 1e6:.1f}",
                f"{meta.get('activation_bytes', 0) / 1e6:.1f}",
                "yes" if meta.get("weight_streaming") else "no",
                f"{meta.get('build_seconds', 0):.1f}" if "build_seconds" in meta else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
