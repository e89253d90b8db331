"""Ahead-of-time TensorRT-RTX engine builds, one engine per stage, on a machine with or without a GPU.

ONNX -> strongly typed network -> one optimization profile (from the family spec) -> serialized engine for
a list of compute capabilities. Naming the capabilities is what lets the build run without a GPU; which
ones, and the metadata written beside each engine, are in engine_meta.py.

Engines are built with WEIGHT_STREAMING by default: at run time a budget decides how much of the weights
stay on the GPU (all of them by default), so one engine serves a 32 GB and a 16 GB card.

A build is skipped while the metadata beside the engine (`<stage>.json`) matches the request; otherwise the
engine is rebuilt and one log line says which field changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..cache import atomic_write_bytes, file_lock, read_json_object, sweep_temps
from ..engines.rtx import TrtLogger, require_trt, trt
from ..errors import InvalidInputError, PipelineError
from ..families import Family, ShapeRange, StageSpec
from .engine_meta import (
    DEFAULT_TARGETS,
    TARGETS,
    BuildReport,
    Profile,
    check_precision_targets,
    default_targets,
    engine_metadata,
    onnx_weights,
    parse_targets,
    why_rebuild,
)

logger = logging.getLogger(__name__)


class EngineBuildError(PipelineError):
    """An ONNX file cannot be parsed or built into a TensorRT-RTX engine."""


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
        reason = "forced" if force else why_rebuild(read_json_object(meta_path), meta, out_path)
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
    require_trt()
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
