"""The family specs: the one place stage names and dims are defined must be usable by every consumer."""

from __future__ import annotations

import pytest

from pipeline.families import ShapeRange, family_for
from pipeline.loading import read_model


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd", "tiny_sdxl"])
def test_tensor_names_are_unique_per_stage(model: str, request: pytest.FixtureRequest) -> None:
    """ONNX and TensorRT need every tensor name in a graph to be unique (inputs and outputs together)."""
    family = family_for(read_model(request.getfixturevalue(model)))
    for stage in family.stages.values():
        names = stage.input_names + stage.output_names
        assert len(names) == len(set(names)), stage.name


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd", "tiny_sdxl"])
def test_profiles_cover_the_dims_of_requests_in_range(model: str, request: pytest.FixtureRequest) -> None:
    family = family_for(read_model(request.getfixturevalue(model)))
    g = family.granularity
    shape_range = ShapeRange(
        min_size=(g * 2, g * 2), opt_size=(g * 4, g * 4), max_size=(g * 6, g * 8), max_batch=2
    )
    ranges = family.dim_ranges(shape_range)
    for stage in family.stages.values():
        assert set(stage.dim_names) <= set(ranges), stage.name
    dims = family.dims(g * 5, g * 7, 2)
    for name, value in dims.items():
        if name in ranges:
            assert value in ranges[name], name


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd", "tiny_sdxl"])
def test_every_stage_returns_the_outputs_its_spec_declares(
    model: str, request: pytest.FixtureRequest
) -> None:
    """What export, the engines and the pipeline bind by name is what the diffusers modules really return:
    each stage called through its spec's forward gives exactly the declared outputs, in the declared shapes."""
    import torch

    source = read_model(request.getfixturevalue(model))
    family = family_for(source)
    g = family.granularity
    dims = family.dims(2 * g, 3 * g, 2)
    dims.setdefault("text_tokens", 16)
    for stage in family.stages.values():
        module = source.load_component(stage.component, torch.float32)
        inputs = stage.example_inputs(
            dims, torch.float32, generator=torch.Generator().manual_seed(0), int_high=50
        )
        with torch.no_grad():
            outputs = stage.forward(module, inputs)
        assert list(outputs) == stage.output_names, stage.name
        for spec in stage.outputs:
            assert tuple(outputs[spec.name].shape) == spec.concrete(dims), (stage.name, spec.name)
