"""ONNX export of each pipeline stage, driven by the family's `StageSpec`.

One `<stage>.onnx` per stage (weights of 2 GB or more go to `<stage>.onnx.data` beside it) and a
`manifest.json` describing every exported stage: tensors with symbolic dims, source model and hash, dtype,
opset, exporter and library versions. The exporter is `torch.onnx.export(dynamo=True)`: it traces through
`torch.export`, names dynamic dims after the spec's dim names, and gives graphs onnxruntime and TensorRT-RTX
parse without custom ops.

Nothing a later run trusts is ever half-written: a stage's manifest entry is dropped before its files are
replaced, files are written in a temp folder and renamed into place, and the entry (with the ONNX file's
sha256) is written last. A stage whose entry matches what would be exported now is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from ..cache import ensure_writable_dir, file_lock, sha256_file, sweep_temps
from ..errors import InvalidInputError
from ..families import Family, StageSpec, TensorSpec, family_for
from ..loading import ModelSource, resolve_model
from ..options import dtype_name, parse_device
from .graph_passes import make_initializers_contiguous, optimize, rename_output_dims
from .manifest import MANIFEST, entry_problem, read_manifest, set_entry
from .translations import custom_translations

logger = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the oldest opset torch's dynamo exporter writes
# A protobuf message cannot exceed 2 GiB; weights from 2 GB (decimal) on go to external data, which leaves
# room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

_VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx-ir")


class StageModule(torch.nn.Module):
    """A stage as a plain module: inputs positional in spec order, outputs a tuple in spec order."""

    def __init__(self, spec: StageSpec, module: torch.nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.spec.forward(self.module, dict(zip(self.spec.input_names, inputs, strict=True)))
        return tuple(outputs[name] for name in self.spec.output_names)


# ---- what is exported -----------------------------------------------------------------------------------


def onnx_output_names(spec: StageSpec) -> list[str]:
    """ONNX names of a stage's outputs: the spec's, with `_out` added where an input has the same name.

    ONNX (and TensorRT) need every tensor name unique; the SD UNet takes `sample` and returns `sample`.
    """
    inputs = set(spec.input_names)
    return [f"{name}_out" if name in inputs else name for name in spec.output_names]


def trace_dims(family: Family) -> dict[str, int]:
    """Dim values for tracing: batch 2, a non-square size, so no two dynamic dims share a value."""
    unit = family.granularity * 8  # a multiple of every down-sampling factor of the denoisers
    return family.dims(3 * unit, 5 * unit, 2)


def _int_high(module: torch.nn.Module) -> int:
    """Upper bound for random token ids: the vocabulary size where the module has one."""
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    return min(100, int(vocab)) if vocab else 100


def _tensor_entry(t: TensorSpec, dtype: torch.dtype, onnx_name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": t.name,
        "dtype": str(t.torch_dtype(dtype)).removeprefix("torch."),
        "shape": list(t.shape),
    }
    if onnx_name is not None and onnx_name != t.name:
        entry["onnx_name"] = onnx_name
    return entry


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


@dataclass(frozen=True)
class Fp8Export:
    """How the denoiser is written in fp8 (pipeline/export/fp8.py); the other stages keep the model dtype."""

    method: Any  # fp8.Fp8Method
    calibration_size: tuple[int, int] | None = None  # (height, width); default: the model's size
    calibration_prompts: int = 4
    calibration_steps: int = 4

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fp8_method": str(self.method)}
        if str(self.method) == "modelopt":
            out["calibration"] = [
                list(self.calibration_size or ()),
                self.calibration_prompts,
                self.calibration_steps,
            ]
        return out


def stage_precision(family: Family, spec: StageSpec, dtype: torch.dtype, fp8: Fp8Export | None) -> str:
    return "fp8" if fp8 is not None and spec.name == family.denoiser else dtype_name(dtype)


def _identity(
    source: ModelSource,
    spec: StageSpec,
    dtype: torch.dtype,
    opset: int,
    precision: str | None = None,
    fp8: Fp8Export | None = None,
) -> dict[str, Any]:
    """Everything that decides an export's content; a manifest entry matches when all of it is equal."""
    extra: dict[str, Any] = {"precision": precision or dtype_name(dtype)}
    if precision == "fp8" and fp8 is not None:
        extra.update(fp8.identity())
    return extra | {
        "inputs": [_tensor_entry(t, dtype) for t in spec.inputs],
        "outputs": [
            _tensor_entry(t, dtype, n) for t, n in zip(spec.outputs, onnx_output_names(spec), strict=True)
        ],
        "component": spec.component,
        "source_hash": source.content_hash,
        "dtype": dtype_name(dtype),
        "opset": opset,
        "exporter": EXPORTER,
        "versions": library_versions(),
    }


# ---- export ---------------------------------------------------------------------------------------------


def _resolve(source_or_model: ModelSource | str | Path) -> ModelSource:
    if isinstance(source_or_model, ModelSource):
        return source_or_model
    return resolve_model(source_or_model)


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_stage(
    source: ModelSource,
    family: Family,
    spec: StageSpec,
    out_dir: Path,
    dtype: torch.dtype,
    opset: int,
    device: torch.device | str,
    fp8: Fp8Export | None = None,
) -> dict[str, Any]:
    """Trace, convert and write one stage; returns the file facts of its manifest entry."""
    from . import fp8 as fp8_ops

    start = time.perf_counter()
    module = source.load_component(spec.component, dtype, device)
    fp8 = fp8 if fp8 is not None and spec.name == family.denoiser else None
    table = custom_translations()
    trace_context: Any = contextlib.nullcontext()
    if fp8 is not None and fp8.method is fp8_ops.Fp8Method.MODELOPT:
        loop = fp8_ops.calibration_loop(
            family,
            source,
            torch.device(device),
            dtype,
            size=fp8.calibration_size or (family.default_size, family.default_size),
            prompts=fp8_ops.CALIBRATION_PROMPTS[: fp8.calibration_prompts],
            steps=fp8.calibration_steps,
        )
        module = fp8_ops.quantize_with_modelopt(module, family.fp8_modules, loop)
        table |= fp8_ops.translations()
        trace_context = fp8_ops.export_context()
    dims = trace_dims(family)
    inputs = spec.example_inputs(
        dims, dtype, device, generator=torch.Generator().manual_seed(0), int_high=_int_high(module)
    )
    dynamic_shapes = tuple(t.dynamic_axes for t in spec.inputs)
    weights = _weight_bytes(module)
    external = weights >= EXTERNAL_DATA_THRESHOLD
    logger.info(
        "%s: exporting %s (%.2f GB %s) at %s",
        spec.name,
        spec.component,
        weights / 1e9,
        dtype_name(dtype),
        ", ".join(f"{k}={v}" for k, v in dims.items() if k in spec.dim_names),
    )
    with torch.no_grad(), trace_context:
        program = torch.onnx.export(
            StageModule(spec, module).eval(),
            tuple(inputs[name] for name in spec.input_names),
            input_names=spec.input_names,
            output_names=onnx_output_names(spec),
            dynamic_shapes=(dynamic_shapes,),  # one entry: the wrapper's *inputs
            opset_version=opset,
            dynamo=True,
            optimize=False,  # _optimize below: the exporter's optimizer is quadratic in graph size
            verbose=False,
            custom_translation_table=table,
        )
    if fp8 is not None and fp8.method is fp8_ops.Fp8Method.WEIGHT_ONLY:
        n = fp8_ops.insert_weight_qdq(program.model, family.fp8_modules)
        logger.info("%s: fp8 weight-only Q/DQ on %d Linear weights", spec.name, n)
    optimize(program.model)
    if fp8 is not None:
        folded = fp8_ops.fold_weight_qdq(program.model)
        if not folded:
            raise InvalidInputError(f"{spec.name}: fp8 quantized no weight (patterns {family.fp8_modules})")
        wanted = fp8_ops.selected_linears(module, family.fp8_modules)
        logger.info("%s: %d of %d weights stored as FP8 (%s)", spec.name, folded, wanted, fp8.method)
        if folded < wanted:
            logger.warning("%s: %d Linear layers stayed in %s", spec.name, wanted - folded, dtype_name(dtype))
    rename_output_dims(program, spec)
    make_initializers_contiguous(program.model)
    converted = time.perf_counter()
    logger.info("%s: traced and converted in %.1f s; writing", spec.name, converted - start)

    onnx_name = f"{spec.name}.onnx"
    data_name = f"{onnx_name}.data"
    # `.<stage>.onnx.<random>.tmp`: a killed export's temp folder is swept at a later run (cache/files.py)
    tmp = Path(tempfile.mkdtemp(prefix=f".{onnx_name}.", suffix=".tmp", dir=out_dir))
    try:
        # Our threshold decides, not torch's `save` (which goes external from 1.5 GiB on, so a 1.7 GB model
        # got a data file this function did not expect and dropped).
        ir.save(program.model, tmp / onnx_name, external_data=data_name if external else None)
        del program, module
        facts: dict[str, Any] = {"file": onnx_name, "external_data": data_name if external else None}
        facts["size"] = (tmp / onnx_name).stat().st_size
        facts["sha256"] = sha256_file(tmp / onnx_name)
        if external:
            facts["data_size"] = (tmp / data_name).stat().st_size
            (tmp / data_name).replace(out_dir / data_name)
        (tmp / onnx_name).replace(out_dir / onnx_name)
        if not external:
            (out_dir / data_name).unlink(missing_ok=True)  # a stale one from an earlier export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    facts["trace_dims"] = {k: v for k, v in dims.items() if k in spec.dim_names}
    end = time.perf_counter()
    logger.info(
        "%s: wrote %s in %.1f s (%.1f s writing)",
        spec.name,
        out_dir / onnx_name,
        end - start,
        end - converted,
    )
    return facts


def _export_stage(
    source: ModelSource,
    family: Family,
    stage: str,
    out_dir: Path,
    dtype: torch.dtype,
    opset: int,
    force: bool,
    device: torch.device | str,
    fp8: Fp8Export | None = None,
) -> Path:
    spec = family.stages[stage]
    dtype = family.stage_dtype(stage, dtype)  # the stage's own dtype (SDXL: an fp32 VAE in an fp16 export)
    precision = stage_precision(family, spec, dtype, fp8)
    identity = _identity(source, spec, dtype, opset, precision, fp8)
    entry = read_manifest(out_dir).get(stage)
    if entry is not None and not force:
        problem = entry_problem(out_dir, entry, identity)
        if problem is None:
            logger.info("%s: up to date in %s (manifest matches), skipping", stage, out_dir)
            return out_dir / entry["file"]
        logger.info("%s: re-exporting, %s", stage, problem)
    # From here until the new entry is written, no entry vouches for this stage's files.
    set_entry(out_dir, stage, None)
    facts = _write_stage(
        source, family, spec, out_dir, dtype, opset, device, fp8 if precision == "fp8" else None
    )
    set_entry(out_dir, stage, {**facts, **identity, "model_id": source.model_id})
    return out_dir / facts["file"]


def _check_stages(family: Family, stages: Iterable[str] | None) -> list[str]:
    if stages is None:
        return list(family.stages)
    names = list(stages)
    unknown = [s for s in names if s not in family.stages]
    if unknown:
        raise InvalidInputError(
            f"unknown stage {', '.join(map(repr, unknown))} for {family.name}; "
            f"choose from {', '.join(family.stages)}"
        )
    return names


def export_stage(
    source_or_model: ModelSource | str | Path,
    stage: str,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    opset: int | None = None,
    force: bool = False,
    device: torch.device | str = "cpu",
    fp8: Fp8Export | None = None,
    progress: bool = True,
) -> Path:
    """Export one stage to `out_dir/<stage>.onnx` (skipped when the manifest entry matches); its path."""
    return export_model(
        source_or_model,
        out_dir,
        stages=[stage],
        dtype=dtype,
        opset=opset,
        force=force,
        device=device,
        fp8=fp8,
        progress=progress,
    )[stage]


def export_model(
    source_or_model: ModelSource | str | Path,
    out_dir: str | Path,
    *,
    stages: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    opset: int | None = None,
    force: bool = False,
    device: torch.device | str = "cpu",
    fp8: Fp8Export | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Export the stages of a model (all by default) to `out_dir`; stage name -> its .onnx path.

    `source_or_model` is a `ModelSource` or anything `resolve_model` takes (folder, hub id, built-in name).
    `fp8`: write the denoiser as FP8 Q/DQ (pipeline/export/fp8.py); the other stages stay in `dtype`.
    """
    from tqdm.auto import tqdm

    device = parse_device(device)
    source = _resolve(source_or_model)
    family = family_for(source)
    names = _check_stages(family, stages)
    dtype_name(dtype)  # refuse unknown dtypes before any work
    out = ensure_writable_dir(out_dir)
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < MIN_OPSET:
        raise InvalidInputError(f"opset {opset} is too old for the exporter; use {MIN_OPSET} or newer")
    paths = {}
    # Exports of one folder take turns: a second process waits (saying for whom), then finds the stages
    # up to date. Temp folders of killed exports go first.
    sweep_temps(out)
    with (
        file_lock(out / MANIFEST, None, purpose=f"exporting {source.model_id} to ONNX"),
        tqdm(total=len(names), desc="onnx", unit="stage", disable=not progress, leave=False) as bar,
    ):
        for name in names:
            bar.set_description(f"onnx {name}")
            paths[name] = _export_stage(source, family, name, out, dtype, opset, force, device, fp8)
            bar.update(1)
    return paths
