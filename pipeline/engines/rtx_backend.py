"""`backend="rtx"`: every stage as a ready-built TensorRT-RTX engine, one runtime cache, one activation buffer.

Building is a visible step of its own: `python -m pipeline --build-engines --model M [--precision fp8]` (or
`python -m export M --engines`) exports each stage to ONNX and builds its engine with progress, times and
sizes. `from_pretrained(backend="rtx")` then only loads: where engines are missing it raises
`EnginesNotBuiltError` naming that command, or builds them first (same display) with `build=True`.

Before anything loads, the engines' memory plan (their `<stage>.json`, pipeline/engines/memory.py) is checked
against the GPU's free memory: a plan that cannot fit is refused with one line naming the fix. Then:

- the denoiser's weight-streaming budget is what the VRAM budget (`vram_budget=` GB, default: the free
  memory) leaves after everything else;
- every execution context shares ONE activation buffer (stages run one after another);
- with `low_vram=True` each stage group's weights come onto the GPU for its turn only (text encoders are
  released after encoding, the denoiser after the loop), using TensorRT-RTX's deferred weight loading;
- engines whose validity check says a rebuild helps are rebuilt when `build=True`; otherwise, and whenever a
  rebuild cannot help (GPU memory, driver, CUDA error), the error says what to do.

Everything lives in the model's cache folder (`ModelCache`): `onnx/<set>/`, `engines/<platform>/<set>/`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import ModelCache, read_json_object, resolve_runtime_cache
from ..errors import EnginesNotBuiltError, InvalidInputError
from ..families import Family, ShapeRange
from ..options import dtype_name
from .base import Backend, Precision, Specialization, parse_precision
from .memory import GB, MemoryPlan, Residency, SharedDeviceMemory
from .rtx import StaleEngineError, require_trt, trt
from .rtx_cache import RuntimeCache
from .rtx_engine import RtxEngine

logger = logging.getLogger(__name__)

_TORCH_ONLY = ("compile",)
RTX_OPTIONS = ("vram_budget", "low_vram", "build", "targets", "shape_range", "weight_streaming", "fp8_method")


def default_shape_range(family: Family) -> ShapeRange:
    """What engines serve unless asked otherwise: half to one and a half times the model's default size
    (multiples of the family's granularity), one to four images per call."""
    g, size = family.granularity, family.default_size
    lo = max(g, (size // 2) // g * g)
    hi = (size * 3 // 2) // g * g
    return ShapeRange(min_size=(lo, lo), opt_size=(size, size), max_size=(hi, hi), max_batch=4)


@dataclass(frozen=True)
class EngineSet:
    """Where one model's engines of one precision live on one platform, and how to build them."""

    family: Family
    model_cache: ModelCache
    dtype: torch.dtype
    precision: Precision | None  # FP8: an fp8 denoiser; None: every stage in the model dtype

    @property
    def tag(self) -> str:
        """`bf16`, `fp16`, `fp32`, or `<dtype>-fp8` (fp8 denoiser, the other stages in the model dtype)."""
        base = dtype_name(self.dtype)
        return f"{base}-fp8" if self.precision is Precision.FP8 else base

    @property
    def onnx_dir(self) -> Path:
        return self.model_cache.onnx_dir / self.tag

    @property
    def engine_dir(self) -> Path:
        return self.model_cache.engine_dir / self.tag

    def build_command(self) -> str:
        """The one command that builds this set."""
        parts = ["python -m pipeline --build-engines", f"--model {self.family.source.model_id}"]
        if self.precision is Precision.FP8:
            parts.append("--precision fp8")
        elif self.dtype != self.family.default_cuda_dtype:
            parts.append(f"--dtype {dtype_name(self.dtype)}")
        return " ".join(parts)

    def find(self) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
        """Every stage's engine and metadata, or EnginesNotBuiltError naming the command that builds them.

        Nothing is hashed here: the metadata says what an engine was built from, and the build step is where
        a changed ONNX is noticed.
        """
        paths, metadata, missing = {}, {}, []
        for name in self.family.stages:
            path = self.engine_dir / f"{name}.engine"
            meta = read_json_object(path.with_suffix(".json"))
            if not path.is_file() or meta is None:
                missing.append(name)
                continue
            if meta.get("tensorrt_rtx") != trt.__version__:
                raise EnginesNotBuiltError(
                    f"the {name} engine in {self.engine_dir} was built by TensorRT-RTX {meta.get('tensorrt_rtx')}, "
                    f"this is {trt.__version__}: rebuild with {self.build_command()}"
                )
            paths[name], metadata[name] = path, meta
        if missing:
            raise EnginesNotBuiltError(
                f"no {self.tag} TensorRT-RTX engines for {', '.join(missing)} of {self.family.source.model_id} "
                f"in {self.engine_dir}; build them with: {self.build_command()} "
                "(or pass build=True to from_pretrained)"
            )
        return paths, metadata

    def build(
        self,
        *,
        device: torch.device | str = "cpu",
        targets: tuple[str, ...] | None = None,
        shape_range: ShapeRange | None = None,
        weight_streaming: bool = True,
        fp8_method: str | None = None,
        stages: list[str] | None = None,
        force: bool = False,
        progress: bool = True,
        refittable: bool = False,
    ) -> dict[str, Path]:
        """Export (skipped while the ONNX manifest matches) and build (skipped while each engine's metadata
        matches) every stage, with progress bars; returns the engine paths. `refittable`: the stages a LoRA
        changes are built refittable (engines/rtx_refit.py; the build then needs a CUDA GPU)."""
        require_trt()  # before the export, which would take minutes for nothing
        from ..export.engine_meta import default_targets
        from ..export.engines import build_engines
        from ..export.fp8 import choose_method
        from ..export.onnx_export import Fp8Export, export_model

        fp8 = None
        if self.precision is Precision.FP8:
            fp8 = Fp8Export(choose_method(fp8_method))
        export_device = torch.device(device)
        export_model(
            self.family.source,
            self.onnx_dir,
            stages=stages,
            dtype=self.dtype,
            device=export_device if export_device.type == "cuda" else "cpu",
            fp8=fp8,
            progress=progress,
        )
        precision = "fp8" if fp8 is not None else None
        return build_engines(
            self.family,
            self.onnx_dir,
            self.engine_dir,
            stages=stages,
            targets=targets or default_targets(precision),
            shape_range=shape_range or default_shape_range(self.family),
            weight_streaming=weight_streaming,
            force=force,
            progress=progress,
            refittable=refittable,
        )

    def plan(self, metadata: Mapping[str, Mapping[str, Any]]) -> MemoryPlan:
        return MemoryPlan.from_metadata(metadata, self.family.denoiser, model=self.family.source.model_id)


def engine_precision(precision: str | None, dtype: torch.dtype) -> Precision | None:
    """The engines' precision beyond their dtype: FP8 for an fp8 denoiser, None for the model dtype alone
    (a dtype name given as a precision is refused, pointing at --dtype: one knob for the dtype)."""
    return parse_precision(precision)


class _LowVram:
    """One stage group's weights on the GPU at a time (deferred engines): calling an engine of another group
    first unloads the weights of the group that ran before."""

    def __init__(self) -> None:
        self.active: tuple[RtxEngine, ...] = ()

    def enter(self, group: tuple[RtxEngine, ...]) -> None:
        if group is self.active:
            return
        for engine in self.active:
            engine.unload_weights()
        self.active = group


class _CycledEngine:
    """An engine whose group's weights come onto the GPU when it is called (low VRAM)."""

    def __init__(self, engine: RtxEngine, group: tuple[RtxEngine, ...], cycle: _LowVram) -> None:
        self.engine, self.group, self.cycle = engine, group, cycle
        self.stage = engine.stage

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.cycle.enter(self.group)
        return self.engine(**inputs)


class RtxBackend(Backend):
    name = "rtx"

    def __init__(
        self,
        family: Family,
        device: torch.device,
        dtype: torch.dtype,
        *,
        model_cache: ModelCache,
        specialization: str | None = None,
        cuda_graphs: bool | None = None,
        precision: str | None = None,
        vram_budget: float | None = None,
        low_vram: bool = False,
        build: bool = False,
        targets: tuple[str, ...] | None = None,
        shape_range: ShapeRange | None = None,
        weight_streaming: bool = True,
        fp8_method: str | None = None,
        cache_dir: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(family, device, dtype)
        unknown = [k for k, v in options.items() if v is not None and k not in _TORCH_ONLY]
        if unknown:
            raise InvalidInputError(f"unknown rtx backend options: {', '.join(unknown)}")
        ignored = [k for k in _TORCH_ONLY if options.get(k) is not None]
        if ignored:
            logger.warning("options %s apply to the torch backend only; ignored", ", ".join(ignored))
        self.device = (
            device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        )
        self.specialization = Specialization(specialization or Specialization.LAZY)
        self.residency = Residency.LOW_VRAM if low_vram else Residency.RESIDENT
        self.set = EngineSet(family, model_cache, dtype, engine_precision(precision, dtype))
        self.model_cache = model_cache
        if self.set.precision is Precision.FP8 and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise InvalidInputError(
                f"fp8 engines need compute capability 8.9 or newer (RTX 40/50); {self.device} is "
                f"{torch.cuda.get_device_name(self.device)}: use --precision {dtype_name(dtype)}"
            )
        self._build = dict(
            device=self.device,
            targets=targets or ("current",),
            shape_range=shape_range,
            weight_streaming=weight_streaming,
            fp8_method=fp8_method,
            # built on this GPU: LoRAs refit the denoiser and text encoders (engines/rtx_refit.py); not fp8
            refittable=self.set.precision is not Precision.FP8,
        )
        if build:
            self.set.build(**self._build)
        paths, metadata = self.set.find()

        # 1. the plan, before anything loads
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = None if vram_budget is None else int(float(vram_budget) * GB)
        self.plan = self.set.plan(metadata)
        self.placement = self.plan.check(free, vram_budget=budget, residency=self.residency)

        # 2. one runtime cache and one activation buffer for every stage
        resolve_runtime_cache(model_cache)  # copies a matching shipped cache in when the user has none
        self.runtime_cache = RuntimeCache(
            model_cache.runtime_cache_path, model_cache.platform_key, model_cache.driver_version
        )
        self.memory = SharedDeviceMemory(self.device)
        loaded: dict[str, RtxEngine] = {}
        for name in family.stages:
            graphs = cuda_graphs if cuda_graphs is not None else name == family.denoiser
            try:
                loaded[name] = self._load(name, paths[name], graphs)
            except StaleEngineError as e:
                if not build:
                    raise EnginesNotBuiltError(f"{e}: {self.set.build_command()}") from e
                logger.info("%s; rebuilding", e)
                self.set.build(**self._build, stages=[name], force=True)
                loaded[name] = self._load(name, paths[name], graphs)

        # 3. low VRAM: the stage groups take turns on the GPU
        if self.residency is Residency.LOW_VRAM:
            cycle = _LowVram()
            for names in self.plan.groups:
                group = tuple(loaded[n] for n in names)
                for n in names:
                    self.engines[n] = _CycledEngine(loaded[n], group, cycle)
        else:
            self.engines.update(loaded)
        self._loaded = loaded
        logger.info(
            "rtx: %d engines (%s), activations %.2f GB shared, planned peak %.1f GB of %.1f GB",
            len(loaded),
            self.set.tag,
            self.memory.size / GB,
            self.placement.peak_bytes / GB,
            self.placement.vram_budget / GB,
        )

    def _load(self, name: str, path: Path, graphs: bool) -> RtxEngine:
        budget = self.placement.denoiser_budget if name == self.family.denoiser else None
        return RtxEngine(
            path,
            self.family.stages[name],
            cache=self.runtime_cache,
            specialization=self.specialization,
            cuda_graphs=graphs,
            family=self.family,
            device=self.device,
            weight_budget_bytes=budget,
            memory=self.memory,
            deferred=self.residency is Residency.LOW_VRAM,
        )

    def describe(self) -> str:
        extra = ", low VRAM" if self.residency is Residency.LOW_VRAM else ""
        if self.placement.streams:
            extra += f", streaming {self.placement.denoiser_budget / GB:.1f} GB budget"
        return f"rtx ({self.set.tag}, {self.specialization.value} specialization{extra})"

    def close(self) -> None:
        self.runtime_cache.save()
