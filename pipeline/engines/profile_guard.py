"""Request shapes against an engine's optimization profile, in the words a user knows (pixels, images,
tokens), before TensorRT-RTX sees them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import InvalidInputError, OutOfProfileError

if TYPE_CHECKING:
    from ..families import Family, StageSpec


class _DimWords:
    """Turns a stage's dynamic dims into the words a user knows (pixels, images, tokens)."""

    def __init__(self, family: Family | None) -> None:
        self.scale: dict[str, float] = {}
        if family is not None:
            size = family.default_size
            dims = family.dims(size, size, 1)
            for name, value in dims.items():
                if name.endswith(("_height", "_width")) and value:
                    self.scale[name] = size / value
                elif name == "image_tokens" and value:
                    self.scale[name] = size * size / value

    def describe(self, dim: str, value: int, lo: int, hi: int) -> str:
        if dim in self.scale and dim.endswith(("_height", "_width")):
            s = self.scale[dim]
            word = "height" if dim.endswith("_height") else "width"
            flag = "--max-size" if value > hi else "--min-size"
            px = round(value * s)
            return (
                f"{word} {px} is outside the engine's {round(lo * s)}..{round(hi * s)} range; "
                f"rebuild with {flag} {px}x{px} (or the size you need)"
            )
        if dim == "image_tokens" and dim in self.scale:
            side = [round(math.sqrt(v * self.scale[dim])) for v in (value, lo, hi)]
            flag = "--max-size" if value > hi else "--min-size"
            return (
                f"an image of about {side[0]}x{side[0]} pixels ({value} tokens) is outside the engine's "
                f"{side[1]}x{side[1]}..{side[2]}x{side[2]} range ({lo}..{hi} tokens); "
                f"rebuild with {flag} {side[0]}x{side[0]}"
            )
        if dim in ("batch", "unet_batch"):
            what = "batch" if dim == "batch" else "denoiser batch (images x2 with guidance)"
            return (
                f"{what} {value} is outside the engine's {lo}..{hi} range; rebuild with a larger --max-batch"
            )
        if dim == "text_tokens":
            return (
                f"prompt length {value} tokens is outside the engine's {lo}..{hi} range; "
                f"use a max_sequence_length in {lo}..{hi}"
            )
        return (
            f"{dim} {value} is outside the engine's {lo}..{hi} range; rebuild the engine with a wider range"
        )


class ProfileGuard:
    """Checks request shapes against an engine's optimization profile, before TensorRT-RTX sees them.

    A shape outside the profile raises OutOfProfileError in the user's words (pixels, batch, tokens) with
    what to rebuild with, instead of a TensorRT error trace.
    """

    def __init__(
        self, stage: StageSpec, profile: Mapping[str, Sequence[Sequence[int]]], family: Family | None = None
    ) -> None:
        self.stage = stage
        self.profile = {name: [tuple(s) for s in shapes] for name, shapes in profile.items()}
        self._specs = {t.name: t for t in stage.inputs}
        self._words = _DimWords(family)

    def check(self, name: str, shape: Sequence[int]) -> None:
        shape = tuple(shape)
        lo, _, hi = self.profile[name]
        spec = self._specs.get(name)
        if len(shape) != len(lo):
            raise InvalidInputError(
                f"{self.stage.name} input {name} has shape {shape}, expected {len(lo)} dims"
            )
        for axis, value in enumerate(shape):
            if lo[axis] <= value <= hi[axis]:
                continue
            dim = spec.shape[axis] if spec is not None and axis < len(spec.shape) else None
            if isinstance(dim, str):
                raise OutOfProfileError(
                    f"{self.stage.name}: {self._words.describe(dim, value, lo[axis], hi[axis])}"
                )
            raise OutOfProfileError(
                f"{self.stage.name} input {name} has shape {shape}; the engine takes {lo}..{hi}; "
                "the ONNX and engine were made for another model configuration: re-export and rebuild"
            )
