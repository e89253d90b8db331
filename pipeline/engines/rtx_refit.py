"""LoRA on the rtx backend: merged into the weights it changes and refitted into the TensorRT-RTX engines.

Build (`make_refittable`, called by export/engines.py for the stages a LoRA can change: the denoiser and the
CLIP text encoders, diffusers' `_lora_loadable_modules`): REFIT_INDIVIDUAL, with exactly the weights a LoRA
can change marked refittable, the kernel of every Linear and Conv2d layer. Biases, norms, embeddings and
every other constant stay build-time constants that TensorRT-RTX folds and fuses. Chosen over REFIT (every
weight refittable) for those foldings, and over STRIP_PLAN + refit from the ONNX (a weightless engine must be
refitted with all of its weights, 24 GB for FLUX.1, at every load; the engine cache is made for loading
fast). TensorRT-RTX 1.7.1 builds refittable engines only on a machine with a CUDA GPU: on one without, any
refit flag fails in its Myelin compiler on a CUDA call (even for a one-layer network).

Run (`RefitWeights`, a `WeightStore` of pipeline/lora/): W0 is the ONNX initializer the engine was built
from, read again for each refit (no copy kept in memory); W = W0 + the merged deltas in float32 on the GPU,
cast to the engine's weight dtype, laid out as the initializer, handed to `trt.Refitter.set_named_weights`
from device memory, about 1 GiB of weights per `refit_cuda_engine` call (on an idle stream); weights the
refitter reports missing (combined with those given) get what they hold now, W0 plus their own LoRA terms.
Execution contexts of the engine stay valid across refits.

Names: the ONNX parser names each weight after its initializer, so refit names are initializer names. torch's
exporter folds a Linear's `Transpose(weight)` into a new initializer (`val_123`, (in, out) layout), so the map
from a torch layer to its initializer is read from the graph: the MatMul / Gemm / Conv node consuming it
records the torch module path (`pkg.torch.onnx.name_scopes`) and class (`pkg.torch.onnx.class_hierarchy`),
and its op (MatMul, Gemm's transB) gives the layout. Nothing here depends on a LoRA: ONNX files and engine
keys are the same with or without one.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoraError
from ..lora import Restore, Site, Term, lora_components, merged_delta

if TYPE_CHECKING:
    from ..families import Family
    from ..loading import ModelSource
    from .base import Backend

logger = logging.getLogger(__name__)

LAYER_OPS = ("MatMul", "Gemm", "Conv")
LAYER_CLASSES = ("torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d")
_SCOPES, _CLASSES = "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"
_ROOT = "module."  # the export's StageModule holds the stage's module as `module`
REFIT_CHUNK_BYTES = 1 << 30  # merged weights alive on the GPU at once during a switch (one refit each)


@dataclass(frozen=True)
class RefitWeight:
    """A torch layer's weight as an ONNX initializer (and so as an engine weight)."""

    layer: str  # the layer's name in its component, e.g. transformer_blocks.0.attn.to_q
    name: str  # the initializer's name: the engine's weight name
    shape: tuple[int, ...]  # torch layout (out, in[, kh, kw])
    transposed: bool  # stored (in, out)
    dtype: torch.dtype


def _torch_dtype(data_type: Any) -> torch.dtype | None:
    import onnx_ir as ir

    return {
        ir.DataType.FLOAT: torch.float32,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16,
    }.get(data_type)


def refit_map(model: Any) -> dict[str, RefitWeight]:
    """Layer name -> its weight, for every Linear / Conv2d layer of an exported stage (an onnx_ir Model).

    A layer whose weight is shared (one initializer, several consumers) or split is left out: refitting it
    would change another layer too.
    """
    inits = model.graph.initializers
    found: dict[str, list[RefitWeight]] = {}
    for node in model.graph:
        if node.op_type not in LAYER_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        value = node.inputs[1]
        if value.name not in inits or value.const_value is None:
            continue
        scopes = ast.literal_eval(node.metadata_props.get(_SCOPES, "[]"))
        classes = ast.literal_eval(node.metadata_props.get(_CLASSES, "[]"))
        if len(scopes) < 2 or len(classes) < 2 or classes[-2] not in LAYER_CLASSES:
            continue
        if not scopes[-2].startswith(_ROOT):
            continue
        dims = tuple(int(d) for d in value.const_value.shape)
        dtype = _torch_dtype(value.const_value.dtype)
        if dtype is None or (node.op_type != "Conv" and len(dims) != 2):
            continue
        if node.op_type == "MatMul":
            transposed = True
        elif node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            transposed = not (trans_b is not None and trans_b.value)
        else:
            transposed = False
        shape = dims[::-1] if transposed else dims
        layer = scopes[-2].removeprefix(_ROOT)
        found.setdefault(layer, []).append(RefitWeight(layer, value.name, shape, transposed, dtype))
    out = {}
    for layer, weights in found.items():
        value = inits[weights[0].name]
        if len({w.name for w in weights}) == 1 and len(value.uses()) == 1:
            out[layer] = weights[0]
        else:
            logger.debug("%s: weight shared or split in the ONNX graph; not refittable by LoRA", layer)
    return out


def lora_stages(family: Family) -> dict[str, str]:
    """Component -> stage name, for the stages a LoRA can change."""
    components = set(lora_components(family.source))
    return {s.component: s.name for s in family.stages.values() if s.component in components}


def make_refittable(network: Any, config: Any, onnx_path: str | Path) -> int:
    """Build-time: mark every Linear / Conv2d kernel of a parsed stage refittable (REFIT_INDIVIDUAL).

    Returns how many weights were marked. Raises EngineBuildError where TensorRT-RTX cannot build a
    refittable engine (no CUDA GPU) or the network lacks a weight the ONNX names.
    """
    import onnx_ir as ir

    from ..export.engines import EngineBuildError
    from .rtx import trt

    if not torch.cuda.is_available():
        raise EngineBuildError(
            "TensorRT-RTX builds refittable engines (needed for LoRA) only on a machine with a CUDA GPU; "
            "build without refit here, or build where the engines will run"
        )
    weights = refit_map(ir.load(str(onnx_path)))
    missing = [w.name for w in weights.values() if not network.mark_weights_refittable(w.name)]
    if missing:
        raise EngineBuildError(f"{onnx_path}: TensorRT-RTX has no weights named {missing[:3]}; re-export")
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    logger.info("%s: %d LoRA-changeable weights marked refittable", Path(onnx_path).name, len(weights))
    return len(weights)


def initializer(model: Any, name: str) -> torch.Tensor:
    """An initializer's values as a CPU tensor in its own layout and dtype."""
    tensor = model.graph.initializers[name].const_value
    dtype = _torch_dtype(tensor.dtype)
    if dtype is None:
        raise LoraError(f"initializer {name} has dtype {tensor.dtype}, which refit does not handle")
    return torch.frombuffer(bytearray(tensor.tobytes()), dtype=dtype).reshape(tuple(tensor.shape))


class RefitWeights:
    """Engine weights as a LoRA WeightStore: merged from the ONNX W0, then refitted per stage."""

    restore = Restore.COPY  # W0 is kept where it already is: the ONNX the engines were built from

    def __init__(
        self,
        stages: Mapping[str, tuple[str, Path]],
        engines: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """stages: component -> (stage name, ONNX path); engines: stage name -> trt.ICudaEngine."""
        import onnx_ir as ir

        self.stages = {c: stage for c, (stage, _) in stages.items()}
        self.models = {stage: ir.load(str(path)) for stage, path in stages.values()}
        self.maps = {c: refit_map(self.models[stage]) for c, stage in self.stages.items()}
        self.engines = engines or {}
        self.device = torch.device(device)
        self._weights: dict[str, tuple[str, RefitWeight]] = {}  # site key -> (stage, weight)
        self._applied: dict[str, dict[str, tuple[RefitWeight, list[Term]]]] = {}  # stage -> name -> terms

    @classmethod
    def for_backend(cls, backend: Backend, source: ModelSource) -> RefitWeights:
        onnx_dir = backend.model_cache.onnx_dir  # type: ignore[attr-defined]
        stages = {c: (s, onnx_dir / f"{s}.onnx") for c, s in lora_stages(backend.family).items()}
        engines = {s: backend.engines[s].engine for s, _ in stages.values()}  # type: ignore[attr-defined]
        return cls(stages, engines, backend.device)

    def has_module(self, component: str, name: str) -> bool:
        return any(layer == name or layer.startswith(f"{name}.") for layer in self.maps.get(component, ()))

    def locate(self, component: str, layer: str) -> Site | None:
        weight = self.maps.get(component, {}).get(layer)
        if weight is None:
            return None
        stage = self.stages[component]
        key = f"{stage}:{weight.name}"
        self._weights[key] = (stage, weight)
        return Site(key, weight.shape, self.device, weight.dtype)

    def value(self, stage: str, weight: RefitWeight, terms: Sequence[Term]) -> torch.Tensor:
        """W0 + terms, in the initializer's layout and dtype, on the device (W0 itself for no terms)."""
        w0 = initializer(self.models[stage], weight.name).to(self.device)
        if not terms:
            return w0
        w = (w0.float().t() if weight.transposed else w0.float()) + merged_delta(
            terms, weight.shape, self.device
        )
        return (w.t() if weight.transposed else w).to(weight.dtype).contiguous()

    def merged(self, updates: Mapping[str, Sequence[Term]]) -> dict[str, dict[str, torch.Tensor]]:
        """Stage -> {weight name: W0 + terms} for `updates` (no engine needed; nothing recorded)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, terms in updates.items():
            stage, weight = self._weights[key]
            out.setdefault(stage, {})[weight.name] = self.value(stage, weight, terms)
        return out

    def current(self, stage: str, name: str) -> torch.Tensor:
        """What an engine weight should hold now: W0 + the terms applied to it (the refitter may ask for any
        weight combined with one being refitted)."""
        if name not in self.models[stage].graph.initializers:
            raise LoraError(
                f"the {stage} engine asks for weights {name!r} its ONNX does not hold; rebuild it"
            )
        weight, terms = self._applied.get(stage, {}).get(name, (None, []))
        if weight is None:  # no LoRA on it: W0
            return initializer(self.models[stage], name).to(self.device)
        return self.value(stage, weight, terms)

    def write(self, updates: Mapping[str, Sequence[Term]]) -> None:
        names: dict[str, list[str]] = {}
        for key, terms in updates.items():
            stage, weight = self._weights[key]
            self._applied.setdefault(stage, {})[weight.name] = (weight, list(terms))
            names.setdefault(stage, []).append(weight.name)
        for stage, todo in names.items():
            # a bounded amount of merged weights on the GPU at a time: one refit per chunk
            chunk: list[str] = []
            size = 0
            for i, name in enumerate(todo):
                weight = self._applied[stage][name][0]
                chunk.append(name)
                size += math.prod(weight.shape) * weight.dtype.itemsize
                if size >= REFIT_CHUNK_BYTES or i == len(todo) - 1:
                    tensors = {n: self.current(stage, n) for n in chunk}
                    refit_engine(self.engines[stage], tensors, lambda n, s=stage: self.current(s, n))
                    chunk, size = [], 0
            logger.info("%s: refitted %d weights", stage, len(todo))

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            stage, weight = self._weights.pop(key, (None, None))
            if stage is not None:
                self._applied.get(stage, {}).pop(weight.name, None)


def refit_engine(
    engine: Any, weights: Mapping[str, torch.Tensor], supply: Callable[[str], torch.Tensor]
) -> None:
    """Refit `engine` (a trt.ICudaEngine) with `weights`, supplying what it reports missing from `supply`."""
    from .rtx import TrtLogger, _torch_dtypes, trt

    if not engine.refittable:
        raise LoraError(
            "this engine was built without refit; rebuild it (the rtx backend builds refittable ones)"
        )
    trt_logger = TrtLogger()
    refitter = trt.Refitter(engine, trt_logger)
    dtypes = _torch_dtypes()
    keep = []  # the tensors must outlive refit_cuda_engine (they may be released after it returns)

    def give(name: str, tensor: torch.Tensor) -> None:
        proto = refitter.get_weights_prototype(name)
        if proto.size != tensor.numel():
            raise LoraError(
                f"engine weight {name} holds {proto.size} values, the merged weight {tensor.numel()}"
            )
        tensor = tensor.to(dtypes[proto.dtype]).contiguous()
        keep.append(tensor)
        where = trt.TensorLocation.DEVICE if tensor.is_cuda else trt.TensorLocation.HOST
        if not refitter.set_named_weights(
            name, trt.Weights(proto.dtype, tensor.data_ptr(), tensor.numel()), where
        ):
            raise LoraError(f"TensorRT-RTX refused new weights for {name}: {trt_logger.last_error()}")

    for name, tensor in weights.items():
        give(name, tensor)
    for name in refitter.get_missing_weights():  # weights TensorRT-RTX combined with those given
        give(name, supply(name))
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()  # refit needs an engine with no pending work
    if not refitter.refit_cuda_engine():
        raise LoraError(f"TensorRT-RTX could not refit the engine: {trt_logger.last_error()}")
    # the refitter and `keep` go when this returns: TensorRT-RTX holds no reference after refit_cuda_engine
