"""FLUX.1 and Stable Diffusion text-to-image through adaptive inference engines."""

from __future__ import annotations

import logging

from .errors import (
    BackendUnavailableError,
    EnginesNotBuiltError,
    InsufficientMemoryError,
    InvalidInputError,
    ModelNotFoundError,
    OutOfProfileError,
    OutputError,
    PipelineError,
    UnsupportedModelError,
)
from .pipeline import Pipeline, PipelineOutput

logging.getLogger("pipeline").addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailableError",
    "EnginesNotBuiltError",
    "InsufficientMemoryError",
    "InvalidInputError",
    "ModelNotFoundError",
    "OutOfProfileError",
    "OutputError",
    "Pipeline",
    "PipelineError",
    "PipelineOutput",
    "UnsupportedModelError",
]
