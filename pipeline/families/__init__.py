"""Model families: one place for each family's stages, shapes and pipeline math."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..loading import ModelSource
from .base import DimRange, Family, ShapeRange, StageSpec, TensorSpec
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

FAMILIES: tuple[type[Family], ...] = (FluxFamily, StableDiffusionFamily, StableDiffusionXLFamily)

__all__ = [
    "FAMILIES",
    "DimRange",
    "Family",
    "FluxFamily",
    "ShapeRange",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "StageSpec",
    "TensorSpec",
    "family_for",
]


def family_for(source: ModelSource) -> Family:
    """The family of a model, read from its model_index.json `_class_name`."""
    for family in FAMILIES:
        if source.pipeline_class in family.pipeline_classes:
            return family(source)
    supported = sorted(c for f in FAMILIES for c in f.pipeline_classes)
    raise UnsupportedModelError(
        f"{source.model_id} is a {source.pipeline_class or 'model without _class_name'}; "
        f"supported pipelines: {', '.join(supported)}"
    )
