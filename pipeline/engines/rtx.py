"""TensorRT-RTX at run time: one engine per stage, one runtime cache per pipeline.

`RtxEngine` runs one stage as `engine(**tensors) -> {name: tensor}` with torch CUDA tensors, on the caller's
current torch stream (`execute_async_v3`, no synchronize). Each engine has its own `IRuntimeConfig`: the
dynamic-shape kernel specialization strategy (lazy by default: generic kernels at once, shape-specialized
ones swapped in when compiled) and the CUDA graph strategy (whole-graph capture when `cuda_graphs`).

`RuntimeCache` is the one `IRuntimeCache` every stage shares: the kernels TensorRT-RTX JIT-compiled, read
once from its file under a lock, written once at `save()` / `close()` / context exit (temp file + rename,
under the lock). A corrupt file, or one from another GPU or TensorRT-RTX version, is one warning and a
fresh cache, replaced on save. The file is pipeline.cache's container (magic, platform key, sha256).

Only the documented tensorrt_rtx 1.7 Python API is used. It runs on GPUs of compute capability 8.0, 8.6, 8.9
and 12.x; `rtx_supported()` says whether this machine has one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cache import driver_problem, load_blob, platform_info, save_blob
from ..errors import InvalidInputError, OutOfProfileError, PipelineError
from .base import Specialization

if TYPE_CHECKING:
    from ..families import Family, StageSpec

try:
    import tensorrt_rtx as trt
except ImportError as _e:  # the torch backend still works; rtx_supported() says why rtx does not
    trt = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

logger = logging.getLogger(__name__)

SUPPORTED_CC = ((8, 0), (8, 6), (8, 9))  # plus every 12.x


class StaleEngineError(PipelineError):
    """An engine file cannot run here (other TensorRT-RTX version, GPU, CUDA, or damaged): rebuild it."""


# ---- TensorRT-RTX logging -----------------------------------------------------------------------------------
if trt is not None:

    class TrtLogger(trt.ILogger):
        """Routes TensorRT-RTX messages to `logging` (debug) and keeps the errors for our own messages."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            logger.debug("TensorRT-RTX [%s] %s", severity.name, msg)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from TensorRT-RTX"


# ---- can it run here ----------------------------------------------------------------------------------------
def rtx_supported() -> tuple[bool, str]:
    """(True, why) when tensorrt_rtx imports and the current CUDA GPU is one it runs on; else (False, why not)."""
    if trt is None:
        return False, f"tensorrt_rtx is not importable ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    where = f"{name} (compute capability {major}.{minor})"
    if (major, minor) in SUPPORTED_CC or major == 12:
        return True, f"TensorRT-RTX {trt.__version__} runs on {where}"
    return False, f"TensorRT-RTX {trt.__version__} does not run on {where}; it needs 8.0, 8.6, 8.9 or 12.x"


class RuntimeCache:
    """The one TensorRT-RTX runtime cache shared by every stage of a pipeline, persisted in one file.

    The file is read once here; the `IRuntimeCache` is created with the first engine's runtime config (the
    API creates it from an `IRuntimeConfig`) and attached to every engine's config. `save()` writes it back
    once; `close()` and leaving a `with` block save too.
    """

    def __init__(self, path: str | Path, key: str | None = None, driver_version: str | None = None) -> None:
        self.path = Path(path)
        if key is None:
            info = platform_info("rtx", torch.device("cuda"))
            key, driver_version = info.key, info.driver_version
        self.key = key
        self.driver_version = driver_version  # recorded on save; a cache needs a driver at least this new
        self._blob = load_blob(
            self.path, self.key, check=lambda h: driver_problem(h.meta.get("driver_version"), driver_version)
        )
        self._cache: Any = None  # trt.IRuntimeCache
        self._owner: Any = None  # the IRuntimeConfig that created it, kept alive with it
        self._closed = False

    @property
    def loaded_bytes(self) -> int:
        return len(self._blob or b"")

    def attach(self, runtime_config: Any) -> None:
        """Make `runtime_config` (an IRuntimeConfig) use the shared cache, creating it on first use."""
        if self._cache is None:
            cache = runtime_config.create_runtime_cache()
            if cache is None:
                raise RuntimeError("TensorRT-RTX could not create a runtime cache")
            if self._blob and not cache.deserialize(self._blob):
                logger.warning(
                    "runtime cache %s does not fit this GPU, driver or TensorRT-RTX version; "
                    "starting a fresh one, replaced on save",
                    self.path,
                )
                cache.reset()
            self._cache, self._owner = cache, runtime_config
            self._blob = None
        if not runtime_config.set_runtime_cache(self._cache):
            raise RuntimeError("TensorRT-RTX refused to attach the runtime cache to a runtime config")

    def save(self) -> bool:
        """Write the cache file (lock + atomic replace); False when nothing to save or it cannot be written."""
        if self._cache is None:
            return False
        blob = bytes(memoryview(self._cache.serialize()))
        meta = {"kind": "tensorrt_rtx runtime cache", "driver_version": self.driver_version}
        if not save_blob(self.path, blob, self.key, meta=meta):
            return False
        logger.info("saved runtime cache (%.1f MB) to %s", len(blob) / 1e6, self.path)
        return True

    def close(self) -> None:
        """Save once; later calls do nothing."""
        if not self._closed:
            self._closed = True
            self.save()

    def __enter__(self) -> RuntimeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- one stage ----------------------------------------------------------------------------------------------
def _torch_dtypes() -> dict[Any, torch.dtype]:
    return {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }


def check_validity(data: bytes | memoryview, path: str | Path = "engine") -> None:
    """Raise StaleEngineError unless `Runtime.get_engine_validity` says the engine can run here."""
    runtime = trt.Runtime(TrtLogger())
    validity, diagnostics = runtime.get_engine_validity(data)
    if validity == trt.EngineValidity.INVALID:
        reasons = [
            name.lower().replace("_", " ")
            for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
            if int(diagnostics) & int(flag)
        ]
        raise StaleEngineError(f"{path} cannot run here ({', '.join(reasons) or 'invalid'}); rebuild it")
    if validity == trt.EngineValidity.SUBOPTIMAL:
        logger.info("%s runs here but may be slower than an engine built for this GPU", path)


class _DimWords:
    """Turns a stage's dynamic dims into the words a user knows (pixels, images, tokens)."""

    def __init__(self, family: Family | None) -> None:
        self.scale: dict[str, float] = {}
        if family is not None:
            size = family.default_size
            dims = family.dims(size, size, 1)
            for name, value in dims.items():
                if name.endswith(("_height", "_width")) and value:
                    self.scale[name] = size / value
                elif name == "image_tokens" and value:
                    self.scale[name] = size * size / value

    def describe(self, dim: str, value: int, lo: int, hi: int) -> str:
        if dim in self.scale and dim.endswith(("_height", "_width")):
            s = self.scale[dim]
            word = "height" if dim.endswith("_height") else "width"
            flag = "--max-size" if value > hi else "--min-size"
            px = round(value * s)
            return (
                f"{word} {px} is outside the engine's {round(lo * s)}..{round(hi * s)} range; "
                f"rebuild with {flag} {px}x{px} (or the size you need)"
            )
        if dim == "image_tokens" and dim in self.scale:
            side = [round(math.sqrt(v * self.scale[dim])) for v in (value, lo, hi)]
            flag = "--max-size" if value > hi else "--min-size"
            return (
                f"an image of about {side[0]}x{side[0]} pixels ({value} tokens) is outside the engine's "
                f"{side[1]}x{side[1]}..{side[2]}x{side[2]} range ({lo}..{hi} tokens); "
                f"rebuild with {flag} {side[0]}x{side[0]}"
            )
        if dim in ("batch", "unet_batch"):
            what = "batch" if dim == "batch" else "denoiser batch (images x2 with guidance)"
            return (
                f"{what} {value} is outside the engine's {lo}..{hi} range; rebuild with a larger --max-batch"
            )
        if dim == "text_tokens":
            return (
                f"prompt length {value} tokens is outside the engine's {lo}..{hi} range; "
                f"use a max_sequence_length in {lo}..{hi}"
            )
        return (
            f"{dim} {value} is outside the engine's {lo}..{hi} range; rebuild the engine with a wider range"
        )


class ProfileGuard:
    """Checks request shapes against an engine's optimization profile, before TensorRT-RTX sees them.

    A shape outside the profile raises OutOfProfileError in the user's words (pixels, batch, tokens) with
    what to rebuild with, instead of a TensorRT error trace.
    """

    def __init__(
        self, stage: StageSpec, profile: Mapping[str, Sequence[Sequence[int]]], family: Family | None = None
    ) -> None:
        self.stage = stage
        self.profile = {name: [tuple(s) for s in shapes] for name, shapes in profile.items()}
        self._specs = {t.name: t for t in stage.inputs}
        self._words = _DimWords(family)

    def check(self, name: str, shape: Sequence[int]) -> None:
        shape = tuple(shape)
        lo, _, hi = self.profile[name]
        spec = self._specs.get(name)
        if len(shape) != len(lo):
            raise InvalidInputError(
                f"{self.stage.name} input {name} has shape {shape}, expected {len(lo)} dims"
            )
        for axis, value in enumerate(shape):
            if lo[axis] <= value <= hi[axis]:
                continue
            dim = spec.shape[axis] if spec is not None and axis < len(spec.shape) else None
            if isinstance(dim, str):
                raise OutOfProfileError(
                    f"{self.stage.name}: {self._words.describe(dim, value, lo[axis], hi[axis])}"
                )
            raise OutOfProfileError(
                f"{self.stage.name} input {name} has shape {shape}; the engine takes {lo}..{hi}; "
                "the ONNX and engine were made for another model configuration: re-export and rebuild"
            )


class RtxEngine:
    """One stage as a TensorRT-RTX engine: `engine(**cuda_tensors) -> {output name: tensor}`.

    Inputs are bound by name (`set_input_shape` + `set_tensor_address`); outputs are torch tensors the
    engine owns and reuses while their shape stays the same, so a returned tensor is valid until the next
    call. Engine outputs are matched to the stage's output names by name, else in order (ONNX cannot give
    an output the name of an input, so the export may rename it). Work is enqueued on the current torch
    stream; nothing synchronizes.
    """

    def __init__(
        self,
        path: str | Path,
        stage: StageSpec,
        *,
        cache: RuntimeCache | None = None,
        specialization: Specialization | str = Specialization.LAZY,
        cuda_graphs: bool = False,
        family: Family | None = None,
        weight_budget_bytes: int | None = None,
    ) -> None:
        if trt is None:
            raise RuntimeError(f"tensorrt_rtx is not importable ({_IMPORT_ERROR})")
        self.path = Path(path)
        self.stage = stage
        self.specialization = Specialization(specialization)
        self.cuda_graphs = cuda_graphs
        self._dtypes = _torch_dtypes()
        self._logger = TrtLogger()

        data = self.path.read_bytes()
        check_validity(data, self.path)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise StaleEngineError(f"{self.path} cannot be loaded ({self._logger.last_error()}); rebuild it")
        if weight_budget_bytes is not None and self.engine.streamable_weights_size > 0:
            self.engine.weight_streaming_budget_v2 = weight_budget_bytes

        self.runtime_config = self.engine.create_runtime_config()
        strategy = trt.DynamicShapesKernelSpecializationStrategy
        self.runtime_config.dynamic_shapes_kernel_specialization_strategy = {
            Specialization.LAZY: strategy.LAZY,
            Specialization.EAGER: strategy.EAGER,
            Specialization.NONE: strategy.NONE,
        }[self.specialization]
        graphs = trt.CudaGraphStrategy
        self.runtime_config.cuda_graph_strategy = (
            graphs.WHOLE_GRAPH_CAPTURE if cuda_graphs else graphs.DISABLED
        )
        if cache is not None:
            cache.attach(self.runtime_config)
        self.context = self.engine.create_execution_context(self.runtime_config)
        if self.context is None:
            raise RuntimeError(
                f"TensorRT-RTX could not create a context for {self.path}: {self._logger.last_error()}"
            )

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        engine_outputs = [n for n in names if not is_input[n]]
        if set(stage.output_names) <= set(engine_outputs):
            self.outputs = {n: n for n in stage.output_names}
        elif len(engine_outputs) == len(stage.outputs):
            self.outputs = dict(zip(stage.output_names, engine_outputs, strict=True))
        else:
            raise StaleEngineError(
                f"{self.path} outputs {engine_outputs}, stage {stage.name} expects "
                f"{stage.output_names}; rebuild it from a fresh ONNX export"
            )
        self.profile = {
            n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs
        }
        self.guard = ProfileGuard(stage, self.profile, family)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._warned_default_stream = False

    def describe(self) -> str:
        graphs = "cuda graphs" if self.cuda_graphs else "no cuda graphs"
        return f"{self.stage.name}: TensorRT-RTX {trt.__version__}, {self.specialization.value}, {graphs}"

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise TypeError(f"{self.stage.name} engine needs inputs {missing}")
        keep = []  # contiguous copies stay referenced until enqueued; the stream orders their reuse
        for name in self.inputs:
            tensor = inputs[name]
            shape = tuple(tensor.shape)
            if self._shapes.get(name) != shape:
                self.guard.check(name, shape)
                if not self.context.set_input_shape(name, shape):
                    raise RuntimeError(
                        f"TensorRT-RTX rejected shape {shape} for {name}: {self._logger.last_error()}"
                    )
                self._shapes[name] = shape
            want = self._dtypes[self.engine.get_tensor_dtype(name)]
            if tensor.dtype != want or not tensor.is_cuda:
                raise TypeError(
                    f"{self.stage.name} input {name} must be a CUDA {want} tensor, got {tensor.dtype} "
                    f"on {tensor.device}"
                )
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
                keep.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        device = inputs[self.inputs[0]].device
        out: dict[str, torch.Tensor] = {}
        for stage_name, name in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            buf = self._buffers.get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = torch.empty(
                    shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)], device=device
                )
                self._buffers[name] = buf
            self.context.set_tensor_address(name, buf.data_ptr())
            out[stage_name] = buf
        stream = torch.cuda.current_stream(device).cuda_stream
        if stream == 0 and not self._warned_default_stream:
            self._warned_default_stream = True
            logger.warning(
                "%s runs on the legacy default CUDA stream: TensorRT-RTX then synchronizes around each call "
                "and cannot capture CUDA graphs; run the pipeline under torch.cuda.stream(torch.cuda.Stream())",
                self.stage.name,
            )
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT-RTX failed to run {self.stage.name}: {self._logger.last_error()}")
        return out

    def close(self) -> None:
        """Release the context and engine (GPU memory); the runtime cache is saved by its owner."""
        self._buffers.clear()
        self.context = None
        self.engine = None
