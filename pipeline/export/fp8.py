"""FP8 (E4M3) Q/DQ ONNX of a denoiser, for strongly typed TensorRT-RTX engines with half the weights.

Two methods, chosen by `Fp8Method`:

- **modelopt** (the default where `nvidia-modelopt` is installed, `pip install -e ".[rtx-fp8]"`): NVIDIA's
  Model Optimizer puts FP8 quantizers on the denoiser's Linear layers (weights and inputs, per tensor) and
  calibrates the input scales by running calibration prompts through the torch modules: the text encoders,
  then the real denoising loop (pipeline/denoise.py) for a few steps. The export traces Model Optimizer's
  `tensorrt::quantize_op` and writes it as ONNX QuantizeLinear/DequantizeLinear in FLOAT8E4M3FN
  (`quantize_op_translation`).
- **weight-only** (the fallback, no calibration): per-output-channel FP8 weight scales from each weight's
  own range; activations stay in the model dtype. It still halves the weights.

Either way the weights end up as FLOAT8E4M3FN initializers behind a DequantizeLinear (`fold_weight_qdq`):
the ONNX file itself is half the size of a bf16 one, and TensorRT-RTX keeps them in FP8 in the engine
(measured with tensorrt-rtx 1.7: an 8-layer 1024x1024 MLP gives a 16.8 MB fp16 engine, 8.5 MB with fp8
weights). Which Linear layers are quantized is the family's `fp8_modules` (its repeated blocks).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..families import Family
    from ..loading import ModelSource

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite E4M3FN value
# Calibration: a few varied prompts, through the real loop. NVIDIA's diffusion recipes calibrate on a few
# dozen prompts; the scales are per-tensor maxima, which settle within a handful.
CALIBRATION_PROMPTS = (
    "a red fox in the snow, golden hour",
    "a lighthouse on a cliff at dusk, oil painting",
    "portrait of an old fisherman, detailed skin, 85mm photo",
    "a bowl of ramen on a wooden table, top view",
)
CALIBRATION_STEPS = 4


class Fp8Method(StrEnum):
    MODELOPT = "modelopt"  # calibrated weight + activation Q/DQ through NVIDIA Model Optimizer
    WEIGHT_ONLY = "weight-only"  # per-channel weight Q/DQ, no calibration


def modelopt_available() -> tuple[bool, str]:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        return False, f"nvidia-modelopt is not installed ({e}); pip install -e '.[rtx-fp8]'"
    from importlib.metadata import version

    return True, f"nvidia-modelopt {version('nvidia-modelopt')}"


def choose_method(method: str | Fp8Method | None) -> Fp8Method:
    """The requested method, or modelopt where it is installed and weight-only otherwise (said in one line)."""
    if method is not None:
        try:
            chosen = Fp8Method(method)
        except ValueError:
            raise InvalidInputError(
                f"fp8 method must be one of {', '.join(m.value for m in Fp8Method)}, got {method!r}"
            ) from None
        if chosen is Fp8Method.MODELOPT:
            ok, why = modelopt_available()
            if not ok:
                raise InvalidInputError(f"fp8 method modelopt: {why}")
        return chosen
    ok, why = modelopt_available()
    if ok:
        return Fp8Method.MODELOPT
    logger.warning("%s: fp8 falls back to weight-only quantization (no calibration)", why)
    return Fp8Method.WEIGHT_ONLY


def _selected(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selected_linears(module: torch.nn.Module, patterns: Sequence[str]) -> int:
    """How many Linear layers of `module` the fp8 export should store in FP8."""
    return sum(isinstance(m, torch.nn.Linear) and _selected(n, patterns) for n, m in module.named_modules())


# ---- Model Optimizer: quantizers and calibration through the torch modules -------------------------------
def calibration_loop(
    family: Family,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: tuple[int, int],
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    steps: int = CALIBRATION_STEPS,
) -> Callable[[torch.nn.Module], None]:
    """A Model Optimizer `forward_loop`: prompts -> text encoders (torch) -> `steps` steps of the real
    denoising loop at `size` (height, width), with the module being calibrated as the denoiser."""
    from diffusers.utils.torch_utils import randn_tensor

    from ..denoise import DenoiseState, make_step
    from ..schedule import plan_schedule

    height, width = size
    spec = family.stages[family.denoiser]

    def forward_loop(model: torch.nn.Module) -> None:
        encoders = {
            name: source.load_component(s.component, dtype, device)
            for name, s in family.stages.items()
            if name not in (family.denoiser, "vae_decoder")
        }

        def run(stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            stage_spec = family.stages[stage]
            moved = {t.name: inputs[t.name].to(device, t.torch_dtype(dtype)) for t in stage_spec.inputs}
            return stage_spec.forward(encoders[stage], moved)

        def denoiser(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return spec.forward(model, inputs)

        guidance = family.default_guidance
        start = time.perf_counter()
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                text = family.encode_prompt(run, [prompt], None, guidance, 1)
                generator = torch.Generator("cpu").manual_seed(i)
                noise = randn_tensor(
                    family.latent_shape(1, height, width), generator=generator, device=device, dtype=dtype
                )
                schedule = plan_schedule(
                    source.scheduler,
                    steps,
                    begin_index=family.schedule_begin_index,
                    **family.schedule_kwargs(height, width, steps),
                )
                cond = family.denoiser_conditioning(text, height, width, 1, guidance)
                x0 = family.pack_latents(noise, height, width)
                state = DenoiseState.create(family, schedule, x0, cond, guidance, dtype)
                step = make_step(family, denoiser, state, dtype)
                for _ in range(state.num_steps):
                    step()
        encoders.clear()  # free the text encoders before the export
        logger.info(
            "fp8 calibration: %d prompts x %d steps at %dx%d in %.1f s",
            len(prompts),
            steps,
            width,
            height,
            time.perf_counter() - start,
        )

    return forward_loop


def quantize_with_modelopt(
    module: torch.nn.Module, patterns: Sequence[str], forward_loop: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """FP8 quantizers (per-tensor E4M3, Model Optimizer's FP8 default) on the Linear layers named by
    `patterns`, calibrated by `forward_loop`; every other quantizer disabled before calibration."""
    import modelopt.torch.quantization as mtq

    def loop(model: torch.nn.Module) -> None:
        kept = 0
        for name, sub in model.named_modules():
            linear = isinstance(sub, torch.nn.Linear) and _selected(name, patterns)
            kept += linear
            for quantizer in ("input_quantizer", "weight_quantizer", "output_quantizer"):
                q = getattr(sub, quantizer, None)
                if q is None:
                    continue
                if not linear or quantizer == "output_quantizer":
                    q.disable()
                else:
                    # Model Optimizer's default exclusions are LLM names: '*proj_out.*' would leave FLUX's 38
                    # single-block output projections (1.79 B parameters) in bf16. Ours are chosen by pattern.
                    q.enable()
        if not kept:
            raise InvalidInputError(f"fp8: no Linear layer of the denoiser matches {list(patterns)}")
        logger.info("fp8: %d Linear layers quantized (weights and inputs)", kept)
        forward_loop(model)

    return mtq.quantize(module, mtq.FP8_DEFAULT_CFG, loop)


def export_context() -> Any:
    """Model Optimizer's context for torch.export (its quantizers trace as `tensorrt::quantize_op`)."""
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode()


def quantize_op_translation(
    input: Any, amax: Any, num_bits: int, exponent_bits: int, unsigned: bool, narrow_range: bool
) -> Any:
    """`tensorrt::quantize_op` (Model Optimizer's fake quantizer) -> ONNX Q/DQ in FLOAT8E4M3FN.

    Model Optimizer quantizes x to E4M3 with scale 448 / amax: x_q = fp8(x * 448 / amax); ONNX's
    QuantizeLinear divides by its scale, so the ONNX scale is amax / 448 (folded to a constant later).
    """
    from onnxscript import opset20 as op

    if (num_bits, exponent_bits) != (8, 4):
        raise NotImplementedError(
            f"only E4M3 fp8 quantizers export, got {num_bits} bits, {exponent_bits} exp"
        )
    scale = op.CastLike(op.Div(op.Cast(amax, to=ir.DataType.FLOAT), op.Constant(value_float=FP8_MAX)), input)
    zero = op.Constant(value=ir.Tensor(np.zeros((), np.uint8), dtype=ir.DataType.FLOAT8E4M3FN))
    return op.DequantizeLinear(op.QuantizeLinear(input, scale, zero), scale)


def translations() -> dict[Any, Callable[..., Any]]:
    return {torch.ops.tensorrt.quantize_op.default: quantize_op_translation}


# ---- weight-only: per-channel weight Q/DQ on the exported graph ---------------------------------------------
def insert_weight_qdq(model: ir.Model, patterns: Sequence[str], prefix: str = "module.") -> int:
    """Weight-only FP8: put Q/DQ (per output channel, scale = row max / 448) on every 2-D Linear weight
    initializer whose module matches `patterns` (before graph optimization, while initializers carry the
    parameter names); `fold_weight_qdq` then stores them in FP8. Returns how many weights."""
    graph = model.graph
    count = 0
    for name, value in list(graph.initializers.items()):
        module_name = name.removeprefix(prefix).removesuffix(".weight")
        if not name.endswith(".weight") or not _selected(module_name, patterns):
            continue
        if value.shape is None or value.shape.rank() != 2 or not value.uses():
            continue
        weight = _to_torch(value.const_value).float()
        scale = (weight.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        scale_value = ir.Value(name=f"{name}.fp8_scale", const_value=_scale_tensor(scale, value))
        zero_value = ir.Value(
            name=f"{name}.fp8_zero",
            const_value=ir.Tensor(np.zeros(scale.shape, np.uint8), dtype=ir.DataType.FLOAT8E4M3FN),
        )
        graph.register_initializer(scale_value)
        graph.register_initializer(zero_value)
        uses = list(value.uses())
        q = ir.node("QuantizeLinear", [value, scale_value, zero_value], attributes={"axis": 0})
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale_value], attributes={"axis": 0})
        graph.insert_before(uses[0].node, [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        count += 1
    return count


# ---- both: weights stored as FP8 behind a DequantizeLinear --------------------------------------------------
def fold_weight_qdq(model: ir.Model) -> int:
    """QuantizeLinear(constant weight) -> DequantizeLinear becomes DequantizeLinear(FP8 weight): the weights
    are stored in FLOAT8E4M3FN (half of bf16). Where the DequantizeLinear only feeds a Transpose that only
    feeds MatMuls, the weight is stored transposed and the Transpose dropped, so TensorRT-RTX sees
    DQ -> MatMul. The FP8 values are computed when the file is written (lazily, one tensor at a time, on
    the device the weight lives on). Returns how many weights were folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        weight, scale = node.inputs[0], node.inputs[1]
        if weight is None or weight.const_value is None or scale is None or scale.const_value is None:
            continue  # an activation: stays Q/DQ
        dqs = [use.node for use in node.outputs[0].uses()]
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        axis = _axis(node, weight)
        perm = _foldable_transpose(dq)
        source, scale_array = weight.const_value, _to_torch(scale.const_value).float()
        shape = list(weight.shape)
        if perm is not None:
            shape = [shape[p] for p in perm]
        fp8 = ir.Value(
            name=f"{weight.name}.fp8",
            shape=ir.Shape(shape),
            type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
            const_value=ir.LazyTensor(
                _fp8_producer(source, scale_array, axis, perm),
                dtype=ir.DataType.FLOAT8E4M3FN,
                shape=ir.Shape(shape),
                name=f"{weight.name}.fp8",
            ),
        )
        graph.register_initializer(fp8)
        dq.replace_input_with(0, fp8)
        if perm is not None:
            if axis is not None and scale_array.ndim == 1:
                dq.attributes["axis"] = ir.AttrInt64("axis", perm.index(axis))
            transpose = next(use.node for use in dq.outputs[0].uses())
            dq.outputs[0].shape = ir.Shape(shape)
            transpose.outputs[0].replace_all_uses_with(dq.outputs[0])
            graph.remove(transpose, safe=True)
        graph.remove(node, safe=True)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def _axis(q: ir.Node, weight: ir.Value) -> int | None:
    attr = q.attributes.get("axis")
    if attr is None:
        return 1 if weight.shape is not None and weight.shape.rank() > 1 else None
    axis = int(attr.value)
    return axis % weight.shape.rank() if weight.shape is not None and axis < 0 else axis


def _foldable_transpose(dq: ir.Node) -> list[int] | None:
    uses = list(dq.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Transpose" or dq.outputs[0].is_graph_output():
        return None
    transpose = uses[0].node
    if transpose.outputs[0].is_graph_output():
        return None
    if not all(u.node.op_type == "MatMul" and u.idx == 1 for u in transpose.outputs[0].uses()):
        return None
    attr = transpose.attributes.get("perm")
    rank = dq.outputs[0].shape.rank() if dq.outputs[0].shape is not None else 2
    return [int(p) for p in attr.value] if attr is not None else list(reversed(range(rank)))


def _fp8_producer(
    source: Any, scale: torch.Tensor, axis: int | None, perm: list[int] | None
) -> Callable[[], ir.Tensor]:
    def produce() -> ir.Tensor:
        weight = _to_torch(source)
        s = scale.to(weight.device)
        if s.ndim == 1 and axis is not None:
            shape = [1] * weight.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        q = (weight.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if perm is not None:
            q = q.permute(*perm)
        data = q.contiguous().view(torch.uint8).cpu().numpy()
        return ir.Tensor(data, dtype=ir.DataType.FLOAT8E4M3FN)

    return produce


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _to_torch(tensor: Any) -> torch.Tensor:
    """An onnx_ir tensor -> a torch tensor (the wrapped parameter itself where it is one, no copy)."""
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw
    array = tensor.numpy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _scale_tensor(scale: torch.Tensor, weight: ir.Value) -> ir.Tensor:
    """Scales in the weight's dtype: DequantizeLinear's output dtype is its scale's, and a strongly typed
    network needs it to be the model dtype."""
    import ml_dtypes

    numpy_dtype = {
        ir.DataType.FLOAT: np.float32,
        ir.DataType.FLOAT16: np.float16,
        ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    }[weight.const_value.dtype]
    return ir.Tensor(scale.cpu().numpy().astype(numpy_dtype))


def qdq_counts(model: Any) -> dict[str, int]:
    """How many Q/DQ nodes and FP8 initializers an ONNX model (onnx.ModelProto) holds."""
    import onnx

    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    return {
        "QuantizeLinear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "DequantizeLinear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "fp8_initializers": sum(t.data_type == fp8 for t in model.graph.initializer),
    }
