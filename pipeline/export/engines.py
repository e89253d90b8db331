"""Ahead-of-time TensorRT-RTX engine builds, one engine per stage, on a machine with or without a GPU.

ONNX -> strongly typed network -> one optimization profile (from the family spec) -> serialized engine for
a list of compute capabilities. Naming the capabilities is what lets the build run without a GPU; the
default targets (SM86, SM89, SM120) cover RTX 30/40/50, SM80 and SM75 are added on request, and `current`
builds for the GPU of the building machine only.

Beside each `<stage>.engine` lies `<stage>.json`: ONNX sha256, profile, targets, flags and TensorRT-RTX
version. A build is skipped while that metadata matches the request; otherwise the engine is rebuilt and one
log line says which field changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cache import atomic_write_bytes, file_lock, sha256_file, sweep_temps
from ..engines.rtx import TrtLogger, trt
from ..errors import InvalidInputError, PipelineError
from ..families import Family, ShapeRange, StageSpec
from ..options import parse_size

logger = logging.getLogger(__name__)

METADATA_FORMAT = 1
DEFAULT_TARGETS: tuple[str, ...] = ("sm86", "sm89", "sm120")
TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121", "current")

Profile = Mapping[str, tuple[tuple[int, ...], ...]]  # input name -> (min, opt, max) shapes


class EngineBuildError(PipelineError):
    """An ONNX file cannot be parsed or built into a TensorRT-RTX engine."""


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """'sm86,sm89' or ['SM86', 'sm89'] -> ('sm86', 'sm89'); unknown names raise InvalidInputError."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(dict.fromkeys(t.strip().lower() for t in items if t.strip()))
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown engine targets {unknown or items}; choose from {', '.join(TARGETS)}"
        )
    if "current" in names and len(names) > 1:
        raise InvalidInputError("target 'current' (this machine's GPU) cannot be combined with other targets")
    return names


def external_data_files(model: Any) -> list[str]:
    """The external-data files an ONNX model (a ModelProto) names, relative to its folder, in name order."""
    import onnx

    return sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 over the ONNX file and the external-data files it names (in name order)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError):  # not ONNX: hash the bytes; the parser says what is wrong
        return sha256_file(path)
    data_files = external_data_files(model)
    if not data_files:
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in (path, *(path.parent / name for name in data_files)):
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def engine_metadata(
    onnx_path: str | Path,
    profile: Profile,
    targets: Sequence[str],
    weight_streaming: bool,
    refittable: bool = False,
) -> dict[str, Any]:
    """What an engine is built from; a change in any field means a rebuild."""
    refit = {"refittable": True} if refittable else {}  # absent when False: older engines stay valid
    return {
        "format": METADATA_FORMAT,
        "tensorrt_rtx": trt.__version__,
        "onnx_sha256": onnx_sha256(onnx_path),
        "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
        "targets": list(targets),
        "weight_streaming": weight_streaming,
        "strongly_typed": True,
        **refit,
    }


def _why_rebuild(old: dict[str, Any] | None, new: dict[str, Any], engine_path: Path) -> str | None:
    """None when `old` describes `new` and the engine file exists; else the reason, in a few words."""
    if not engine_path.is_file():
        return "no engine yet"
    if old is None:
        return "no readable metadata beside the engine"
    changes = []
    for key, value in new.items():
        if old.get(key) != value:
            if key == "onnx_sha256":
                changes.append("ONNX changed")
            elif key in ("targets", "tensorrt_rtx", "weight_streaming", "refittable"):
                changes.append(f"{key} changed ({old.get(key)} -> {value})")
            else:
                changes.append(f"{key} changed")
    return ", ".join(changes) or None


def _read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _set_targets(config: Any, targets: Sequence[str]) -> None:
    config.num_compute_capabilities = len(targets)
    for i, name in enumerate(targets):
        config.set_compute_capability(getattr(trt.ComputeCapability, name.upper()), i)


def build_serialized(
    onnx_path: str | Path,
    profile: Profile,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    weight_streaming: bool = False,
    refittable: bool = False,
) -> bytes:
    """Parse an ONNX file and build a serialized TensorRT-RTX engine (no files written).

    refittable: the weights a LoRA can change are refittable (engines/rtx_refit.py; needs a CUDA GPU)."""
    trt_logger = TrtLogger()
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)) or network.num_outputs == 0:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no graph outputs"]
        raise EngineBuildError(
            f"TensorRT-RTX cannot parse {onnx_path}: {'; '.join(errors) or trt_logger.last_error()}; "
            "re-export the ONNX (python -m export MODEL --out DIR --force)"
        )
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in network_inputs:
        if name not in profile:
            raise EngineBuildError(
                f"{onnx_path} has an input {name!r} the family spec does not describe; re-export the ONNX"
            )
        opt_profile.set_shape(name, *profile[name])
    for name in set(profile) - set(network_inputs):
        logger.debug(
            "%s: input %s is not in the ONNX graph (unused by the model); no profile for it", onnx_path, name
        )
    config.add_optimization_profile(opt_profile)
    _set_targets(config, targets)
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if refittable:
        from ..engines.rtx_refit import make_refittable

        make_refittable(network, config, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT-RTX could not build {onnx_path}: {trt_logger.last_error()}")
    return bytes(serialized)


def build_engine(
    onnx_path: str | Path,
    stage_spec: StageSpec,
    profile: Profile,
    out_path: str | Path,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    weight_streaming: bool = False,
    refittable: bool = False,
    force: bool = False,
) -> Path:
    """Build `out_path` (<stage>.engine) from one stage ONNX unless its metadata (<stage>.json) matches.

    The engine and its metadata are written atomically, under a lock on the engine path, metadata last: an
    interrupted build leaves either the old pair or an engine without matching metadata (rebuilt next time).
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise EngineBuildError(
            f"no ONNX for stage {stage_spec.name} at {onnx_path}; run python -m export first"
        )
    targets = parse_targets(targets)
    meta_path = out_path.with_suffix(".json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(out_path.parent)  # what killed builds left
    # builds of one engine take turns: a second process waits (saying for whom), then finds it up to date
    with file_lock(out_path, None, purpose=f"building the {stage_spec.name} TensorRT-RTX engine"):
        meta = engine_metadata(onnx_path, profile, targets, weight_streaming, refittable)
        reason = "forced" if force else _why_rebuild(_read_metadata(meta_path), meta, out_path)
        if reason is None:
            logger.info("%s engine is up to date (%s)", stage_spec.name, out_path)
            return out_path
        logger.info("building %s engine for %s: %s", stage_spec.name, ",".join(targets), reason)
        start = time.perf_counter()
        data = build_serialized(
            onnx_path, profile, targets=targets, weight_streaming=weight_streaming, refittable=refittable
        )
        atomic_write_bytes(out_path, data)
        meta["build_seconds"] = round(time.perf_counter() - start, 2)
        meta["engine_bytes"] = len(data)
        meta["stage"] = stage_spec.name
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        logger.info(
            "built %s engine in %.1f s, %.1f MB: %s",
            stage_spec.name,
            meta["build_seconds"],
            len(data) / 1e6,
            out_path,
        )
    return out_path


def build_engines(
    family: Family,
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    stages: Iterable[str] | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    shape_range: ShapeRange = ShapeRange(),  # noqa: B008 (frozen dataclass)
    weight_streaming: bool = False,
    refittable: bool = False,
    force: bool = False,
) -> dict[str, Path]:
    """Build `out_dir/<stage>.engine` from `onnx_dir/<stage>.onnx` for every (or the named) stage.

    refittable: the stages a LoRA can change are built refittable (engines/rtx_refit.py)."""
    names = list(stages) if stages is not None else list(family.stages)
    unknown = [s for s in names if s not in family.stages]
    if unknown:
        raise InvalidInputError(f"unknown stages {unknown}; {family.name} has {', '.join(family.stages)}")
    refit = set()
    if refittable:
        from ..engines.rtx_refit import lora_stages

        refit = set(lora_stages(family).values())
    out = {}
    for name in names:
        out[name] = build_engine(
            Path(onnx_dir) / f"{name}.onnx",
            family.stages[name],
            family.profile(name, shape_range),
            Path(out_dir) / f"{name}.engine",
            targets=targets,
            weight_streaming=weight_streaming,
            refittable=name in refit,
            force=force,
        )
    return out


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
    and --weight-streaming / --force / --stages where the CLI defines them.
    """
    targets = parse_targets(getattr(args, "targets", None) or DEFAULT_TARGETS)
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
        weight_streaming=bool(getattr(args, "weight_streaming", False)),
        force=bool(getattr(args, "force", False)),
    )
