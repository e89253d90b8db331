"""What a server (or each Ray Serve replica) is started with: one model, its engine options, service limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..options import parse_size


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA loaded at server start (`--lora NAME=PATH[:SCALE]`); requests select it by name."""

    name: str
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise InvalidInputError(f"--lora {text!r}: give NAME=PATH or NAME=PATH:SCALE")
        path, scale = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a path with a colon in it, and no scale
        return cls(name, path, scale)


@dataclass(frozen=True)
class ServeConfig:
    """Everything a server process needs to load its one model and run its queue."""

    model: str
    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)  # compile, cuda_graphs, precision...
    scheduler: str | None = None  # the default scheduler (class name); None: the model's own
    loras: tuple[LoraSpec, ...] = ()
    max_queue: int = 32  # requests waiting (not counting the running batch); more -> 429
    max_batch: int = 4  # images in one pipeline call
    batch_wait: float = 0.005  # seconds the worker waits for same-shape company before a call
    timeout: float = 300.0  # seconds from acceptance to answer, queueing included
    image_dir: str | None = None  # where `url` images are kept (default: <cache root>/serve-images)
    keep_images: int = 1000  # the oldest `url` images beyond this many are removed
    max_side: int = 2048  # pixels per side a request may ask for
    max_steps: int = 200
    # (width, height) served once by the worker before the first request (Pipeline.warm_up): their first
    # requests then run at full speed; /health says "warming" (503) until it is done. None: the model's
    # native size (what a request without `size` gets); (): none
    warm_sizes: tuple[tuple[int, int], ...] | None = None
    # the shapes most served before (sizes.py) warmed while no request waits, after `warm_sizes`; 0: none
    warm_recent: int = 3

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "keep_images", "max_side", "max_steps"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warm_recent < 0:
            raise InvalidInputError("--warm-recent must not be negative")
        if self.timeout <= 0 or self.batch_wait < 0:
            raise InvalidInputError("--timeout must be positive and --batch-wait not negative")
        for width, height in self.warm_sizes or ():
            if not 0 < width <= self.max_side or not 0 < height <= self.max_side:
                raise InvalidInputError(
                    f"--warm-size {width}x{height}: each side must be between 1 and --max-side {self.max_side}"
                )
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"--lora names must be unique, got {', '.join(names)}")


def parse_warm_sizes(values: Sequence[str] | None) -> tuple[tuple[int, int], ...] | None:
    """`--warm-size` values (or Ray's `warm_sizes=WxH,WxH`): None, not given, is the model's native size;
    'none' alone is no warm-up."""
    if values is None:
        return None
    if any(v.strip().lower() == "none" for v in values):
        if len(values) > 1:
            raise InvalidInputError("--warm-size none cannot be combined with sizes")
        return ()
    return tuple(parse_size(text) for text in values)
