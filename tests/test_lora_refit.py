"""LoRA on the rtx backend: what can be checked without a GPU, and the refit itself where one exists.

On CPU (CI): every Linear / Conv2d layer of the LoRA-able stages maps onto an ONNX initializer holding its
weight (transposed where the exporter folded a Transpose); the weights a LoRA touches are weights of the
TensorRT-RTX network the parser builds (the names `mark_weights_refittable` accepts are the names the
refitter will see); the merged weights handed to the refitter equal the torch backend's in-place merge.
TensorRT-RTX 1.7.1 cannot build a refittable engine without a GPU: the build test runs where CUDA exists,
the refit itself on a GPU TensorRT-RTX runs on; elsewhere they skip with that reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import tiny_range
from lora_files import make_loras

from pipeline import Pipeline
from pipeline.engines.rtx import TrtLogger, rtx_supported, trt
from pipeline.engines.rtx_refit import RefitWeights, initializer, lora_stages, refit_map
from pipeline.export.engines import EngineBuildError, build_engines
from pipeline.lora import InPlaceWeights, read_factors, resolve_lora

RTX_OK, RTX_WHY = rtx_supported()
CUDA = torch.cuda.is_available()
NO_GPU = "TensorRT-RTX 1.7.1 builds refittable engines only with a CUDA GPU (its Myelin compiler calls CUDA)"


def _layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}


@pytest.fixture(scope="module", params=["flux", "sd"])
def built(
    request: pytest.FixtureRequest, tiny_engines: dict, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    entry = tiny_engines[request.param]
    family, onnx_dir = entry["family"], entry["root"] / "onnx"
    stages = {c: (s, onnx_dir / f"{s}.onnx") for c, s in lora_stages(family).items()}
    folder = Path(entry["source"].path)
    return {
        **entry,
        "name": request.param,
        "stages": stages,
        "loras": make_loras(folder, tmp_path_factory.mktemp("refit-lora"), request.param),
    }


def test_lora_stages_are_the_denoiser_and_clip(built: dict) -> None:
    family = built["family"]
    assert set(built["stages"]) == {family.stages[family.denoiser].component, "text_encoder"}


def test_every_layer_maps_onto_an_initializer_holding_its_weight(built: dict) -> None:
    source = built["source"]
    for component, (_, path) in built["stages"].items():
        module = source.load_component(component, torch.float32)
        model = ir.load(str(path))
        weights = refit_map(model)
        layers = _layers(module)
        assert set(weights) == set(layers)
        assert any(w.transposed for w in weights.values())  # MatMul weights: (in, out), a folded Transpose
        for name, layer in layers.items():
            stored = initializer(model, weights[name].name)
            stored = stored.t() if weights[name].transposed else stored
            assert torch.equal(stored, layer.weight), name


def test_the_weights_a_lora_touches_are_refittable_in_the_network(built: dict) -> None:
    store = RefitWeights(built["stages"])
    touched: dict[str, set[str]] = {}
    for lora in built["loras"].values():
        for factor in read_factors(resolve_lora(lora), built["source"], store):
            stage, name = factor.site.key.split(":", 1)
            touched.setdefault(stage, set()).add(name)
    assert set(touched) == {s for s, _ in built["stages"].values()}
    for stage, names in touched.items():
        trt_logger = TrtLogger()
        builder = trt.Builder(trt_logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, trt_logger)
        assert parser.parse_from_file(str(dict(built["stages"].values())[stage]))
        assert not network.mark_weights_refittable("no-such-weight")
        for name in sorted(names):
            assert network.mark_weights_refittable(name), (stage, name)
            assert network.are_weights_marked_refittable(name)


def test_refit_weights_equal_the_in_place_merge(built: dict) -> None:
    """What the refitter would get (ONNX W0 + deltas, ONNX layout) equals the torch backend's merged weights."""
    source = built["source"]
    refit = RefitWeights(built["stages"])
    modules = {c: source.load_component(c, torch.float32) for c in built["stages"]}
    in_place = InPlaceWeights(modules)
    for lora, weight in zip(built["loras"].values(), (0.7, 1.3), strict=True):
        file = resolve_lora(lora)
        for store in (refit, in_place):
            terms = {f.site.key: [(f, weight * f.scaling)] for f in read_factors(file, source, store)}
            if store is in_place:
                in_place.write(terms)
            else:
                merged = refit.merged(terms)
        for component, (stage, _) in built["stages"].items():
            weights = refit.maps[component]
            for layer, module in _layers(modules[component]).items():
                if weights[layer].name not in merged.get(stage, {}):
                    continue
                got = merged[stage][weights[layer].name]
                got = got.t() if weights[layer].transposed else got
                torch.testing.assert_close(got, module.weight, rtol=0, atol=1e-6)
        in_place.write({k: [] for k in terms})


@pytest.mark.skipif(CUDA, reason="checks the message given where no GPU exists")
def test_a_refittable_build_without_a_gpu_says_why(built: dict, tmp_path: Path) -> None:
    family, onnx_dir = built["family"], built["root"] / "onnx"
    engines = built["root"] / "engines"  # the session's engines, built without refit: refit means a rebuild
    with pytest.raises(EngineBuildError, match="only on a machine with a CUDA GPU"):
        build_engines(
            family,
            onnx_dir,
            engines,
            stages=[family.denoiser],
            shape_range=tiny_range(family),
            refittable=True,
        )
    assert (engines / f"{family.denoiser}.engine").is_file()  # the old engine is left as it was


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_GPU)
def test_refittable_engines_build_where_a_gpu_is(built: dict, tmp_path: Path) -> None:
    import json

    family = built["family"]
    paths = build_engines(
        family,
        built["root"] / "onnx",
        tmp_path,
        stages=[family.denoiser, "text_encoder", "vae_decoder"],
        shape_range=tiny_range(family),
        refittable=True,
    )
    meta = {s: json.loads(p.with_suffix(".json").read_text()) for s, p in paths.items()}
    assert meta[family.denoiser]["refittable"] and meta["text_encoder"]["refittable"]
    assert "refittable" not in meta["vae_decoder"]  # no LoRA changes the VAE: built as before


@pytest.mark.rtx
@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY)
@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux"])
def test_lora_on_rtx_engines_equals_the_torch_backend(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    folder = request.getfixturevalue(model)
    family = "flux" if model == "tiny_flux" else "sd"
    loras = make_loras(folder, tmp_path, family)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "seed": 1, "output_type": "np"}
    images = {}
    for backend in ("rtx", "torch"):
        pipe = Pipeline.from_pretrained(folder, backend=backend, dtype=torch.float16, cache_dir=tmp_path)
        plain = pipe("a red fox", **kwargs).images
        pipe.load_lora_weights(loras["peft"], adapter_name="a")
        pipe.load_lora_weights(loras["kohya"], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.8, 0.5])
        images[backend] = pipe("a red fox", **kwargs).images
        pipe.unload_lora_weights()
        assert np.abs(pipe("a red fox", **kwargs).images - plain).max() < 1e-3
    assert np.abs(images["rtx"] - images["torch"]).max() < 2e-2
