"""The engine seam: every stage runs as `engine(**named_tensors) -> dict[str, Tensor]`.

The pipeline sees nothing else. A backend (torch, rtx) builds one engine per stage of a family and owns
whatever persists across processes (compile cache, runtime cache); `close()` saves it.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

import torch

from ..families import Family, StageSpec
from ..families.base import Tensors

if TYPE_CHECKING:
    from ..denoise import DenoiseState


class Specialization(StrEnum):
    """When shape-specialized kernels come in for a shape not seen before."""

    LAZY = "lazy"  # serve at once with generic kernels, swap in specialized ones when ready
    EAGER = "eager"  # block once to build specialized kernels, then use them
    NONE = "none"  # generic kernels only


class Precision(StrEnum):
    """What the weights' dtype (`dtype=`) cannot say about how a stage computes."""

    FP8 = "fp8"  # the denoiser's large Linear layers in float8 e4m3; activations and the rest in `dtype`


def parse_precision(value: object) -> Precision | None:
    """None, or Precision from its name; a dtype name gets told to use `dtype` (one knob for the dtype)."""
    from ..errors import InvalidInputError
    from ..options import DTYPES

    if value is None:
        return None
    try:
        return Precision(value)
    except ValueError:
        pass
    hint = (
        f"; {value} is the weights' dtype: pass dtype={value!r} (--dtype {value})" if value in DTYPES else ""
    )
    choices = ", ".join(p.value for p in Precision)
    raise InvalidInputError(f"precision must be one of {choices}, got {value!r}{hint}")


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

    def step_capacity(self, steps: int, row_bytes: int) -> int:
        """How many steps a run's schedule buffers hold (denoise.DenoiseState; `row_bytes` per history row):
        its own by default; a backend that captures the step in a CUDA graph pads them, so one graph serves
        several step counts."""
        return steps

    def denoise(
        self,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
    ) -> DenoiseState:
        """Run every step of the loop over `state`; return the state holding the final history.

        The default runs the step eagerly. A backend may instead capture `make_step(static_state)` in a CUDA
        graph once per shape and replay it, copying `state`'s values into its static buffers first.
        """
        step = make_step(state)
        for _ in range(state.num_steps):
            step()
            on_step()
        return state

    def graphed(self, name: str, fn: Callable[[Tensors], Tensors]) -> Callable[[Tensors], Tensors]:
        """`fn` (named tensors -> named tensors, no host sync), as the loop of a scheduler's own step calls it:
        the denoiser plus guidance, between scheduler updates that run outside any graph.

        The default runs `fn` eagerly. A backend may instead return a `denoise.CudaGraphCall` kept under
        `name` across calls (one CUDA graph per input shapes: copy in, replay, copy out).
        """
        return fn

    def between_calls(self) -> None:
        """Runs before and after each denoising loop, outside any CUDA graph: a backend's housekeeping
        (the torch backend starts and swaps in background compiles). Nothing by default."""

    def close(self) -> None:
        """Persist what this backend compiled (runtime / compile cache). Safe to call twice."""
