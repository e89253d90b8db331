"""One stage as a TensorRT-RTX engine at run time: `RtxEngine`.

`RtxEngine` runs one stage as `engine(**tensors) -> {name: tensor}` with torch CUDA tensors, on the caller's
current torch stream (`execute_async_v3`, no synchronize), on the engine's own device (`cuda:1` is honoured:
deserialization, context creation and every call run under a device guard). Each engine has its own
`IRuntimeConfig`:

- dynamic-shape kernel specialization (lazy by default: generic kernels at once, shape-specialized ones
  swapped in when compiled);
- CUDA graphs (`cuda_graphs=True`): TensorRT-RTX's WHOLE_GRAPH_CAPTURE captures and replays a graph per
  shape. A captured graph holds the tensor addresses it was captured with, so the engine owns one set of
  static input and output buffers per shape: inputs are copied in, outputs are returned from them (valid
  until the next call of that shape), as NVIDIA's demo does. Without CUDA graphs the caller's tensors are
  bound directly (no copy);
- device memory: USER_MANAGED when a `SharedDeviceMemory` is given (one activation buffer for every stage,
  pipeline/engines/memory.py), else TensorRT-RTX's own static allocation;
- weight streaming: `weight_budget_bytes` sets `weight_streaming_budget_v2` before the context exists;
- deferred weights (`deferred=True`): the engine deserializes without its weights; `load_weights()` /
  `unload_weights()` bring them on and off the GPU, so a low-VRAM pipeline cycles its stages through memory.

`RuntimeCache` (rtx_cache.py) is the one `IRuntimeCache` every stage shares. The library itself, its logger,
the engine errors and the validity check are in rtx.py. Only the documented tensorrt_rtx 1.7 Python API is
used, and every call that reports failure is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError
from .base import Specialization
from .profile_guard import ProfileGuard
from .rtx import _IMPORT_ERROR, StaleEngineError, TrtLogger, _torch_dtypes, check_validity, trt

if TYPE_CHECKING:
    from ..families import Family, StageSpec
    from .memory import SharedDeviceMemory
    from .rtx_cache import RuntimeCache

logger = logging.getLogger(__name__)

__all__ = ["RtxEngine"]


def _cuda_device(device: torch.device | str | None) -> torch.device:
    """A CUDA device with its index (the current device when none is named)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise InvalidInputError(f"TensorRT-RTX engines run on a CUDA device, not {dev}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


class RtxEngine:
    """One stage as a TensorRT-RTX engine: `engine(**cuda_tensors) -> {output name: tensor}`.

    Inputs are bound by name (`set_input_shape` + `set_tensor_address`); outputs are tensors the engine owns
    and reuses while their shape stays the same, so a returned tensor is valid until the next call. With CUDA
    graphs the inputs are copied into static per-shape buffers first (see the module docstring). Engine
    outputs are matched to the stage's output names by name, else in order (ONNX cannot give an output the
    name of an input, so the export may rename it). Work is enqueued on the current torch stream; nothing
    synchronizes.
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
        device: torch.device | str | None = None,
        weight_budget_bytes: int | None = None,
        memory: SharedDeviceMemory | None = None,
        deferred: bool = False,
    ) -> None:
        if trt is None:
            raise RuntimeError(f"tensorrt_rtx is not importable ({_IMPORT_ERROR})")
        self.path = Path(path)
        self.stage = stage
        self.device = _cuda_device(device)
        self.specialization = Specialization(specialization)
        self.cuda_graphs = cuda_graphs
        self.memory = memory
        self.deferred = deferred
        self._dtypes = _torch_dtypes()
        self._logger = TrtLogger()
        # what load_weights() needs again (deferred engines keep their plan in host memory)
        self._data: bytes | None = None

        data = self.path.read_bytes()
        with torch.cuda.device(self.device):
            check_validity(data, self.path)
            self.runtime = trt.Runtime(self._logger)
            self.runtime.defer_weights_loading = deferred
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise StaleEngineError(
                    f"{self.path} cannot be loaded ({self._logger.last_error()}); rebuild it"
                )
            if deferred:
                self._data = data
            self.weight_budget_bytes = self._set_weight_budget(weight_budget_bytes)
            self.runtime_config = self._runtime_config(cache)
            self.context = self.engine.create_execution_context(self.runtime_config)
            if self.context is None:
                raise RuntimeError(
                    f"TensorRT-RTX could not create a context for {self.path}: {self._logger.last_error()}"
                )
            # V2: includes the weight-streaming scratch for the budget set above
            self.device_memory_bytes = int(self.engine.device_memory_size_v2)
            if memory is not None:
                memory.bind(self.context, self.device_memory_bytes)

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
        self._shapes: dict[str, tuple[int, ...]] = {}  # input shapes the context was last given
        self._buffers: dict[str, torch.Tensor] = {}  # outputs, reused while their shape stays
        self._static: dict[tuple[tuple[int, ...], ...], dict[str, torch.Tensor]] = {}  # graphs: per shape
        self._bound: tuple[tuple[int, ...], ...] | None = None  # the static set the context points at
        self._checked_stream: int | None = None

    # ---- construction helpers -------------------------------------------------------------------------
    def _set_weight_budget(self, budget: int | None) -> int | None:
        """Set `weight_streaming_budget_v2` (before any context exists); None when the engine streams none."""
        streamable = int(self.engine.streamable_weights_size)
        if budget is None or streamable <= 0:
            if budget is not None:
                logger.info("%s was built without weight streaming; its weights stay on the GPU", self.path)
            return None
        budget = max(0, min(int(budget), streamable))  # >= streamable: nothing is streamed
        self.engine.weight_streaming_budget_v2 = budget
        if int(self.engine.weight_streaming_budget_v2) != budget:
            raise RuntimeError(
                f"TensorRT-RTX did not take weight streaming budget {budget} for {self.path}: "
                f"{self._logger.last_error()}"
            )
        if budget < streamable:
            logger.info(
                "%s: %.2f of %.2f GB of streamable weights on the GPU, the rest streamed each call",
                self.stage.name,
                budget / 1e9,
                streamable / 1e9,
            )
        return budget

    def _runtime_config(self, cache: RuntimeCache | None) -> Any:
        config = self.engine.create_runtime_config()
        strategy = trt.DynamicShapesKernelSpecializationStrategy
        config.dynamic_shapes_kernel_specialization_strategy = {
            Specialization.LAZY: strategy.LAZY,
            Specialization.EAGER: strategy.EAGER,
            Specialization.NONE: strategy.NONE,
        }[self.specialization]
        graphs = trt.CudaGraphStrategy
        config.cuda_graph_strategy = graphs.WHOLE_GRAPH_CAPTURE if self.cuda_graphs else graphs.DISABLED
        if self.memory is not None:
            config.set_execution_context_allocation_strategy(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
        if cache is not None:
            cache.attach(config)
        return config

    def describe(self) -> str:
        graphs = "cuda graphs" if self.cuda_graphs else "no cuda graphs"
        return f"{self.stage.name}: TensorRT-RTX {trt.__version__}, {self.specialization.value}, {graphs}"

    # ---- weights on and off the GPU (deferred engines) ----------------------------------------------------
    @property
    def weights_loaded(self) -> bool:
        return self.engine is not None and bool(self.engine.weights_loaded)

    def load_weights(self) -> None:
        """Bring a deferred engine's weights onto the GPU (a no-op where they are)."""
        if self.weights_loaded:
            return
        if self._data is None:
            raise RuntimeError(f"{self.path} was not deserialized with deferred weights")
        with torch.cuda.device(self.device):
            if not self.engine.load_weights(self._data):
                raise RuntimeError(
                    f"TensorRT-RTX could not load the weights of {self.path}: {self._logger.last_error()}"
                )

    def unload_weights(self) -> None:
        """Free a deferred engine's weights on the GPU, after the work queued on this stream is done."""
        if not self.deferred or not self.weights_loaded:
            return
        with torch.cuda.device(self.device):
            torch.cuda.current_stream(self.device).synchronize()  # no inference may be in flight
            if not self.engine.unload_weights():
                raise RuntimeError(
                    f"TensorRT-RTX could not unload the weights of {self.path}: {self._logger.last_error()}"
                )

    # ---- a call ----------------------------------------------------------------------------------------
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise TypeError(f"{self.stage.name} engine needs inputs {missing}")
        for name in self.inputs:
            tensor = inputs[name]
            want = self._dtypes[self.engine.get_tensor_dtype(name)]
            if tensor.dtype != want or tensor.device != self.device:
                raise TypeError(
                    f"{self.stage.name} input {name} must be a {want} tensor on {self.device}, got "
                    f"{tensor.dtype} on {tensor.device}"
                )
        with torch.cuda.device(self.device):
            if self.deferred:
                self.load_weights()
            stream = torch.cuda.current_stream(self.device).cuda_stream
            self._check_stream(stream)
            keep: list[torch.Tensor] = []  # contiguous copies stay referenced until enqueued
            out = self._bind_static(inputs) if self.cuda_graphs else self._bind_direct(inputs, keep)
            if not self.context.execute_async_v3(stream):
                raise RuntimeError(
                    f"TensorRT-RTX failed to run {self.stage.name}: {self._logger.last_error()}"
                )
        return out

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) == shape:
            return
        self.guard.check(name, shape)
        if not self.context.set_input_shape(name, shape):
            raise RuntimeError(f"TensorRT-RTX rejected shape {shape} for {name}: {self._logger.last_error()}")
        self._shapes[name] = shape

    def _set_address(self, name: str, tensor: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(
                f"TensorRT-RTX refused the address of {self.stage.name}.{name}: {self._logger.last_error()}"
            )

    def _output_tensor(self, name: str) -> torch.Tensor:
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT-RTX could not infer the shape of {self.stage.name}.{name}: {shape}")
        return torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)], device=self.device)

    def _bind_direct(
        self, inputs: Mapping[str, torch.Tensor], keep: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """No CUDA graphs: bind the caller's tensors (contiguous copies where needed), reuse the outputs.

        A copy in `keep` must outlive the enqueue; after it, the caching allocator reuses its memory only in
        this stream's order, after the engine has read it.
        """
        for name in self.inputs:
            tensor = inputs[name]
            self._set_shape(name, tuple(tensor.shape))
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
                keep.append(tensor)
            self._set_address(name, tensor)
        out: dict[str, torch.Tensor] = {}
        for stage_name, name in self.outputs.items():
            buf = self._buffers.get(name)
            shape = tuple(self.context.get_tensor_shape(name))
            if buf is None or tuple(buf.shape) != shape:
                buf = self._buffers[name] = self._output_tensor(name)
            self._set_address(name, buf)
            out[stage_name] = buf
        return out

    def _bind_static(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA graphs: one set of static input/output buffers per shape; the inputs are copied in.

        TensorRT-RTX captures a graph per shape over the addresses bound when it captures, so those
        addresses must stay the same for every replay of that shape: they are this shape's static buffers.
        """
        key = tuple(tuple(inputs[n].shape) for n in self.inputs)
        static = self._static.get(key)
        if static is None:
            for name, shape in zip(self.inputs, key, strict=True):
                self._set_shape(name, shape)
            static = {
                name: torch.empty(shape, dtype=inputs[name].dtype, device=self.device)
                for name, shape in zip(self.inputs, key, strict=True)
            }
            static |= {name: self._output_tensor(name) for name in self.outputs.values()}
            self._static[key] = static
            self._bound = None
        if self._bound != key:
            for name, shape in zip(self.inputs, key, strict=True):
                self._set_shape(name, shape)
            for name, tensor in static.items():
                self._set_address(name, tensor)
            self._bound = key
        for name in self.inputs:
            static[name].copy_(inputs[name], non_blocking=True)
        return {stage_name: static[name] for stage_name, name in self.outputs.items()}

    def _check_stream(self, stream: int) -> None:
        """Once per stream: warn where TensorRT-RTX will synchronize or cannot capture a graph."""
        if self._checked_stream == stream:
            return
        self._checked_stream = stream
        if stream == 0:
            logger.warning(
                "%s runs on the legacy default CUDA stream: TensorRT-RTX then synchronizes around each call "
                "and cannot capture CUDA graphs; run the pipeline under torch.cuda.stream(torch.cuda.Stream())",
                self.stage.name,
            )
        elif self.cuda_graphs and not self.context.is_stream_capturable(stream):
            logger.warning(
                "%s cannot be captured in a CUDA graph on this stream; TensorRT-RTX runs it without one",
                self.stage.name,
            )

    def close(self) -> None:
        """Release the context, the static buffers and the engine (GPU memory); the runtime cache is saved
        by its owner."""
        if self.memory is not None and self.context is not None:
            self.memory.unbind(self.context)
        self._buffers.clear()
        self._static.clear()
        self._data = None
        self.context = None
        self.engine = None
