"""The torch backend: each stage is the diffusers module itself, called through its StageSpec."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..families import Family, StageSpec
from .base import Backend

logger = logging.getLogger(__name__)


class TorchEngine:
    """One stage: a diffusers/transformers module called as `engine(**inputs) -> {name: tensor}`."""

    def __init__(self, stage: StageSpec, module: torch.nn.Module) -> None:
        self.stage = stage
        self.module = module

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.stage.forward(self.module, inputs)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        super().__init__(family, device, dtype)
        if options:
            logger.debug("torch backend options: %s", options)
        self.options = options
        source = family.source
        modules: dict[str, torch.nn.Module] = {}
        for stage in family.stages.values():
            if stage.component not in modules:
                modules[stage.component] = source.load_component(stage.component, dtype, device)
            self.engines[stage.name] = TorchEngine(stage, modules[stage.component])
        self.modules = modules
