"""The engine seam: every stage runs as `engine(**named_tensors) -> dict[str, Tensor]`.

The pipeline sees nothing else. A backend (torch, rtx) builds one engine per stage of a family and owns
whatever persists across processes (compile cache, runtime cache); `close()` saves it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Protocol

import torch

from ..families import Family, StageSpec


class Specialization(str, Enum):
    """When shape-specialized kernels come in for a shape not seen before."""

    LAZY = "lazy"  # serve at once with generic kernels, swap in specialized ones when ready
    EAGER = "eager"  # block once to build specialized kernels, then use them
    NONE = "none"  # generic kernels only


class Precision(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8 = "fp8"

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}[
            self.value
        ]


class Engine(Protocol):
    stage: StageSpec

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Backend(ABC):
    """Builds and owns the engines of one pipeline."""

    name: str

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype) -> None:
        self.family = family
        self.device = device
        self.dtype = dtype
        self.engines: dict[str, Engine] = {}

    def describe(self) -> str:
        """One line for logs and PNG metadata."""
        return self.name

    def close(self) -> None:
        """Persist what this backend compiled (runtime / compile cache). Safe to call twice."""
