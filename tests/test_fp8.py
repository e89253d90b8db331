"""FP8 engines on the CPU: the denoiser's FP8 Q/DQ ONNX (Model Optimizer, and the weight-only fallback), checked
with onnxruntime against the torch module, then built into strongly typed TensorRT-RTX engines with the real
library for SM89/SM120 with weight streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_range

from pipeline.errors import InvalidInputError
from pipeline.export import export_model, read_manifest
from pipeline.export.engine_meta import onnx_weights
from pipeline.export.engines import build_engine, build_engines
from pipeline.export.fp8 import Fp8Method, choose_method, qdq_counts, selected_linears
from pipeline.export.onnx_export import Fp8Export
from pipeline.families import Family

# FP8 E4M3 keeps 3 mantissa bits: one rounding is up to 2^-4 = 6% of a value, but errors average out over a
# dot product; measured on the tiny denoisers 0.2-0.7% of the output's range. Bound: 5%.
FP8_TOLERANCE = 5e-2


def _ort_against_torch(
    family: Family, source, onnx_path: Path, size_units: tuple[int, ...] = (4, 6)
) -> list[float]:
    """Relative error (max |ort - torch| / max |torch|) of the fp8 ONNX against the fp32 torch module."""
    spec = family.stages[family.denoiser]
    module = source.load_component(spec.component, torch.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    errors = []
    for i, units in enumerate(size_units):
        size = units * family.granularity
        dims = family.dims(size, size, 1)
        dims.setdefault("text_tokens", 32)
        x = spec.example_inputs(dims, torch.float32, generator=torch.Generator().manual_seed(i), int_high=50)
        with torch.no_grad():
            want = spec.forward(module, x)["noise_pred"].numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in x.items() if k in names})
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return errors


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_fp8_onnx_holds_e4m3_qdq(tiny_fp8: dict, name: str) -> None:
    fp8 = tiny_fp8[name]
    model = onnx.load(str(fp8["onnx"]))
    counts = qdq_counts(model)
    assert counts["QuantizeLinear"] > 0  # calibrated activations
    assert counts["fp8_initializers"] > 0  # weights stored in FP8 behind a DequantizeLinear
    assert counts["DequantizeLinear"] >= counts["QuantizeLinear"] + counts["fp8_initializers"] - 1
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
    entry = read_manifest(fp8["onnx"].parent)[fp8["family"].denoiser]
    assert entry["precision"] == "fp8" and entry["fp8_method"] == "modelopt"
    # every Linear layer the family names is stored in FP8: none left out by Model Optimizer's own
    # exclusions (its '*proj_out.*' would keep FLUX's single-block output projections in bf16)
    family = fp8["family"]
    module = fp8["source"].load_component(family.stages[family.denoiser].component, torch.float32)
    fp8_weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"} & {
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN
    }
    assert len(fp8_weights) == selected_linears(module, family.fp8_modules)


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_fp8_onnx_matches_torch_within_fp8_tolerance(tiny_fp8: dict, name: str) -> None:
    fp8 = tiny_fp8[name]
    errors = _ort_against_torch(fp8["family"], fp8["source"], fp8["onnx"])
    assert all(1e-5 < e <= FP8_TOLERANCE for e in errors), errors  # quantized, and close


def test_fp8_weights_take_one_byte(tiny_fp8: dict, tiny_engines: dict) -> None:
    for name in ("flux", "sd"):
        model = onnx.load(str(tiny_fp8[name]["onnx"]))
        fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        assert all(len(t.raw_data) == int(np.prod(t.dims)) for t in fp8)
        fp32_onnx = tiny_engines[name]["root"] / "onnx" / f"{tiny_engines[name]['family'].denoiser}.onnx"
        fp8_bytes = sum(len(t.raw_data) for t in fp8)
        total, _ = onnx_weights(tiny_fp8[name]["onnx"])
        assert total + 3 * fp8_bytes == pytest.approx(onnx_weights(fp32_onnx)[0], rel=0.02)  # fp32 -> 1 byte


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_fp8_engines_build_with_weight_streaming_and_a_memory_plan(
    tiny_fp8: dict, tiny_engines: dict, name: str
) -> None:
    fp8 = tiny_fp8[name]
    meta = json.loads(fp8["engine"].with_suffix(".json").read_text())
    assert meta["precision"] == "fp8"
    assert meta["weight_streaming"] is True
    assert meta["targets"] == ["sm89", "sm120"]
    assert meta["denoiser"] is True
    assert meta["activation_bytes"] > 0 and meta["weight_bytes"] > 0 and meta["largest_weight_bytes"] > 0
    fp32 = json.loads(tiny_engines[name]["engines"][fp8["family"].denoiser].with_suffix(".json").read_text())
    assert fp32["precision"] == "fp32"
    assert meta["weight_bytes"] < fp32["weight_bytes"]  # the quantized layers' weights in one byte


def test_weight_only_fallback_without_calibration(tiny_sd: Path, tmp_path: Path) -> None:
    from pipeline.families import family_for
    from pipeline.loading import read_model

    source = read_model(tiny_sd)
    family = family_for(source)
    onnx_path = export_model(
        source, tmp_path / "onnx", stages=["unet"], fp8=Fp8Export(Fp8Method.WEIGHT_ONLY), progress=False
    )["unet"]
    counts = qdq_counts(onnx.load(str(onnx_path)))
    assert counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == counts["fp8_initializers"] > 0
    assert all(1e-5 < e <= FP8_TOLERANCE for e in _ort_against_torch(family, source, onnx_path))
    (engine,) = build_engines(
        family, tmp_path / "onnx", tmp_path / "engines", stages=["unet"], shape_range=tiny_range(family)
    ).values()
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["precision"] == "fp8" and meta["targets"] == ["sm89", "sm120"]  # fp8's default targets


def test_fp8_refuses_gpus_without_fp8(tiny_fp8: dict, tmp_path: Path) -> None:
    fp8 = tiny_fp8["sd"]
    family = fp8["family"]
    with pytest.raises(InvalidInputError, match=r"8\.9 or newer; drop sm86"):
        build_engine(
            fp8["onnx"], family.stages["unet"], family.profile("unet", tiny_range(family)),
            tmp_path / "unet.engine", targets=["sm86", "sm89"], precision="fp8",
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match="fp8 method"):
        choose_method("int4")
