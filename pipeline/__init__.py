"""FLUX.1 and Stable Diffusion text-to-image through adaptive inference engines.

`import pipeline` is cheap: torch and diffusers load when `Pipeline` is first touched, so that the CLI can
answer Ctrl-C (and --help) at any moment, imports included.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import (
    BackendUnavailableError,
    CacheBusyError,
    EnginesNotBuiltError,
    InsufficientMemoryError,
    InvalidInputError,
    LoraError,
    ModelNotFoundError,
    OutOfProfileError,
    OutputError,
    PipelineError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from .pipeline import Pipeline, PipelineOutput

logging.getLogger("pipeline").addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailableError",
    "CacheBusyError",
    "EnginesNotBuiltError",
    "InsufficientMemoryError",
    "InvalidInputError",
    "LoraError",
    "ModelNotFoundError",
    "OutOfProfileError",
    "OutputError",
    "Pipeline",
    "PipelineError",
    "PipelineOutput",
    "UnsupportedModelError",
]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "PipelineOutput"):
        from . import pipeline as module

        return getattr(module, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
