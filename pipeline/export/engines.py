"""Ahead-of-time TensorRT-RTX engine builds, one engine per stage, on a machine with or without a GPU.

ONNX -> strongly typed network -> one optimization profile (from the family spec) -> serialized engine for
a list of compute capabilities. Naming the capabilities is what lets the build run without a GPU; the
default targets (SM86, SM89, SM120) cover RTX 30/40/50, fp8 engines default to SM89 and SM120 (FP8 needs
compute capability 8.9), SM80 is added on request, and `current` builds for the building machine's GPU.
SM75 is refused: TensorRT-RTX 1.7 builds for it, but its runtime refuses compute capability 7.5.

Engines are built with WEIGHT_STREAMING by default: at run time a budget decides how much of the weights
stay on the GPU (all of them by default), so one engine serves a 32 GB and a 16 GB card.

Beside each `<stage>.engine` lies `<stage>.json`: ONNX sha256, profile, targets, flags, precision,
TensorRT-RTX version, and the memory the build reported (weights, activations), which is the stage's part of
the memory plan (pipeline/engines/memory.py) checked before anything loads. A build is skipped while that
metadata matches the request; otherwise the engine is rebuilt and one log line says which field changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..cache import atomic_write_bytes, file_lock, read_json_object, remembered_sha256, sweep_temps
from ..engines.rtx import TrtLogger, trt
from ..errors import InvalidInputError, PipelineError
from ..families import Family, ShapeRange, StageSpec

logger = logging.getLogger(__name__)

METADATA_FORMAT = 2
DEFAULT_TARGETS: tuple[str, ...] = ("sm86", "sm89", "sm120")
FP8_TARGETS: tuple[str, ...] = ("sm89", "sm120")  # FP8 tensor cores: compute capability 8.9 and newer
TARGETS = ("sm80", "sm86", "sm89", "sm120", "sm121", "current")
_REFUSED = {
    "sm75": "TensorRT-RTX 1.7 builds for SM75 but its runtime refuses compute capability 7.5 "
    "(it runs on 8.0, 8.6, 8.9 and 12.x)"
}
_NO_FP8 = ("sm80", "sm86")

Profile = Mapping[str, tuple[tuple[int, ...], ...]]  # input name -> (min, opt, max) shapes


class EngineBuildError(PipelineError):
    """An ONNX file cannot be parsed or built into a TensorRT-RTX engine."""


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """'sm86,sm89' or ['SM86', 'sm89'] -> ('sm86', 'sm89'); unknown names raise InvalidInputError."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(dict.fromkeys(t.strip().lower() for t in items if t.strip()))
    for name in names:
        if name in _REFUSED:
            raise InvalidInputError(f"target {name}: {_REFUSED[name]}; drop it")
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


def check_precision_targets(precision: str, targets: Sequence[str]) -> None:
    """fp8 engines need FP8 tensor cores (compute capability 8.9+): refuse older named targets."""
    old = [t for t in targets if t in _NO_FP8]
    if precision == "fp8" and old:
        raise InvalidInputError(
            f"fp8 engines need compute capability 8.9 or newer; drop {', '.join(old)} from the targets "
            f"(e.g. --targets {','.join(FP8_TARGETS)}) or build with --precision bf16"
        )


def default_targets(precision: str | None) -> tuple[str, ...]:
    return FP8_TARGETS if precision == "fp8" else DEFAULT_TARGETS


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 over the ONNX file and the external-data files it names (in name order).

    Each file's hash is remembered beside it by (size, mtime_ns, inode): a start that finds FLUX's 23.8 GB of
    external data unchanged does not read it again.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError):  # not ONNX: hash the bytes; the parser says what is wrong
        return remembered_sha256(path)
    data_files = external_data_files(model)
    if not data_files:
        return remembered_sha256(path)
    digest = hashlib.sha256()
    for file in (path, *(path.parent / name for name in data_files)):
        digest.update(f"{file.name}:{remembered_sha256(file)}\n".encode())
    return digest.hexdigest()


def onnx_weights(onnx_path: str | Path) -> tuple[int, int]:
    """(total, largest) bytes of an ONNX file's initializers, read from the graph alone (no weights loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    sizes = []
    for tensor in model.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        sizes.append(count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return sum(sizes), max(sizes, default=0)


def engine_metadata(
    onnx_path: str | Path,
    profile: Profile,
    targets: Sequence[str],
    weight_streaming: bool,
    precision: str = "unknown",
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
        "precision": precision,
        **refit,
    }


_REPORT_PATTERNS = {  # TensorRT-RTX 1.7's INFO lines at the end of a build
    "activation_bytes": re.compile(r"Total Activation Memory: (\d+) bytes"),
    "weights_bytes": re.compile(r"Total Weights Memory: (\d+) bytes"),
    "scratch_bytes": re.compile(r"Max Scratch Memory: (\d+) bytes"),
    "device_persistent_bytes": re.compile(r"Total Device Persistent Memory: (\d+) bytes"),
}


@dataclass(frozen=True)
class BuildReport:
    """What TensorRT-RTX's builder says about an engine's device memory (its INFO log; the largest value
    over the targets). Activation memory is for the profile's largest shapes; 0 where it said nothing."""

    activation_bytes: int = 0
    weights_bytes: int = 0
    scratch_bytes: int = 0
    device_persistent_bytes: int = 0

    @classmethod
    def parse(cls, messages: Iterable[str]) -> BuildReport:
        found = dict.fromkeys(_REPORT_PATTERNS, 0)
        for message in messages:
            for key, pattern in _REPORT_PATTERNS.items():
                match = pattern.search(message)
                if match:
                    found[key] = max(found[key], int(match.group(1)))
        return cls(**found)


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
            elif key in ("targets", "tensorrt_rtx", "weight_streaming", "precision", "refittable"):
                changes.append(f"{key} changed ({old.get(key)} -> {value})")
            else:
                changes.append(f"{key} changed")
    return ", ".join(changes) or None


def _set_targets(config: Any, targets: Sequence[str]) -> None:
    config.num_compute_capabilities = len(targets)
    for i, name in enumerate(targets):
        if not config.set_compute_capability(getattr(trt.ComputeCapability, name.upper()), i):
            raise EngineBuildError(
                f"TensorRT-RTX {trt.__version__} refused compute capability {name} as build target {i}; "
                f"choose from {', '.join(TARGETS)}"
            )


class _BuildProgress(trt.IProgressMonitor if trt is not None else object):  # type: ignore[misc]
    """TensorRT-RTX's build phases, shown on a progress bar's postfix (the builder calls from its threads)."""

    def __init__(self, bar: Any) -> None:
        trt.IProgressMonitor.__init__(self)
        self.bar = bar
        self._lock = threading.Lock()
        self._phases: list[str] = []

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases.append(phase_name)
            self.bar.set_postfix_str(phase_name, refresh=True)

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True  # never cancel

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            if phase_name in self._phases:
                self._phases.remove(phase_name)
            self.bar.set_postfix_str(self._phases[-1] if self._phases else "", refresh=True)


def build_serialized(
    onnx_path: str | Path,
    profile: Profile,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    weight_streaming: bool = True,
    progress: Any = None,
    refittable: bool = False,
) -> tuple[bytes, BuildReport]:
    """Parse an ONNX file and build a serialized TensorRT-RTX engine (no files written); with what the
    builder reported about its memory. `progress`: a tqdm bar whose postfix shows the build phase.
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
    monitor = _BuildProgress(progress) if progress is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT-RTX could not build {onnx_path}: {trt_logger.last_error()}")
    return bytes(serialized), BuildReport.parse(trt_logger.infos)


def build_engine(
    onnx_path: str | Path,
    stage_spec: StageSpec,
    profile: Profile,
    out_path: str | Path,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    weight_streaming: bool = True,
    precision: str | None = None,
    refittable: bool = False,
    force: bool = False,
    progress: Any = None,
    denoiser: bool = False,
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
    precision = precision or stage_precision(onnx_path.parent, stage_spec.name)
    check_precision_targets(precision, targets)
    meta_path = out_path.with_suffix(".json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(out_path.parent)  # what killed builds left
    # builds of one engine take turns: a second process waits (saying for whom), then finds it up to date
    with file_lock(out_path, None, purpose=f"building the {stage_spec.name} TensorRT-RTX engine"):
        meta = engine_metadata(onnx_path, profile, targets, weight_streaming, precision, refittable)
        reason = "forced" if force else _why_rebuild(read_json_object(meta_path), meta, out_path)
        if reason is None:
            logger.info("%s engine is up to date (%s)", stage_spec.name, out_path)
            return out_path
        logger.info("building %s engine for %s: %s", stage_spec.name, ",".join(targets), reason)
        start = time.perf_counter()
        data, report = build_serialized(
            onnx_path,
            profile,
            targets=targets,
            weight_streaming=weight_streaming,
            progress=progress,
            refittable=refittable,
        )
        atomic_write_bytes(out_path, data)
        onnx_total, onnx_largest = onnx_weights(onnx_path)
        meta.update(
            stage=stage_spec.name,
            denoiser=denoiser,
            build_seconds=round(time.perf_counter() - start, 2),
            engine_bytes=len(data),
            # the memory plan's inputs (pipeline/engines/memory.py): what the builder reported where it did
            weight_bytes=report.weights_bytes or onnx_total,
            activation_bytes=report.activation_bytes,
            scratch_bytes=report.scratch_bytes,
            device_persistent_bytes=report.device_persistent_bytes,
            onnx_weight_bytes=onnx_total,
            largest_weight_bytes=onnx_largest,
        )
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        logger.info(
            "built %s engine (%s) in %.1f s: %.1f MB engine, %.1f MB weights, %.1f MB activations: %s",
            stage_spec.name,
            precision,
            meta["build_seconds"],
            len(data) / 1e6,
            meta["weight_bytes"] / 1e6,
            report.activation_bytes / 1e6,
            out_path,
        )
    return out_path


def stage_precision(onnx_dir: str | Path, stage: str) -> str:
    """A stage's precision as its export manifest says (fp8, bf16, fp16, fp32), or 'unknown'."""
    from .manifest import read_manifest

    entry = read_manifest(onnx_dir).get(stage) or {}
    return str(entry.get("precision") or entry.get("dtype") or "unknown")


def build_engines(
    family: Family,
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    stages: Iterable[str] | None = None,
    targets: Sequence[str] | None = None,
    shape_range: ShapeRange = ShapeRange(),  # noqa: B008 (frozen dataclass)
    weight_streaming: bool = True,
    refittable: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Build `out_dir/<stage>.engine` from `onnx_dir/<stage>.onnx` for every (or the named) stage.

    Each stage's precision comes from the export manifest; targets default to the portable set for that
    precision. A progress bar shows the stage and TensorRT-RTX's build phase; each built engine is one log
    line with its time and sizes. refittable: the stages a LoRA can change are built refittable
    (engines/rtx_refit.py).
    """
    names = list(stages) if stages is not None else list(family.stages)
    unknown = [s for s in names if s not in family.stages]
    if unknown:
        raise InvalidInputError(f"unknown stages {unknown}; {family.name} has {', '.join(family.stages)}")
    refit = set()
    if refittable:
        from ..engines.rtx_refit import lora_stages

        refit = set(lora_stages(family).values())
    out = {}
    with tqdm(total=len(names), desc="engines", unit="stage", disable=not progress, leave=False) as bar:
        for name in names:
            bar.set_description(f"engine {name}")
            precision = stage_precision(onnx_dir, name)
            out[name] = build_engine(
                Path(onnx_dir) / f"{name}.onnx",
                family.stages[name],
                family.profile(name, shape_range),
                Path(out_dir) / f"{name}.engine",
                targets=targets or default_targets(precision),
                weight_streaming=weight_streaming,
                precision=precision,
                refittable=name in refit,
                force=force,
                progress=bar if progress else None,
                denoiser=name == family.denoiser,
            )
            bar.update(1)
    return out
