"""Regional torch.compile of a stage, with adaptive shape specialization.

Each repeated block of a module (the FLUX transformer blocks, the UNet's attention and resnet blocks, the
VAE decoder's resnets) is wrapped by a `CompiledBlock` holding two compiled versions of the same block:

- generic: compiled once with dynamic shapes; it serves every resolution without recompiling.
- special: compiled with static shapes, once per shape; kernels specialized for that shape.

Blocks of one class share their compiled code (torch.compile caches per code object, and the parameters are
graph inputs), so a FLUX transformer compiles two graphs per version, not 57.

`Regions.run(inputs, call)` picks the version for the shapes of `inputs` by `Specialization`:
none -> always generic; eager -> block on the first call at a shape to compile the special version;
lazy -> serve at once with the generic version while a background thread compiles the special one on a side
stream, and use it from the first call after it is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from .base import Specialization

logger = logging.getLogger(__name__)

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]

# Block classes compiled as regions, besides a model's own `_repeated_blocks` (diffusers' regional list).
EXTRA_REGIONS = ("ResnetBlock2D",)


class Variant(StrEnum):
    EAGER = "eager"
    GENERIC = "generic"
    SPECIAL = "special"


# Held by a background specialization while it runs GPU work, and by a CUDA graph capture.
GPU_WORK_LOCK = threading.Lock()

_local = threading.local()  # the variant the blocks run, per thread (the background compile runs special)


def _current() -> Variant:
    return getattr(_local, "variant", Variant.EAGER)


class CompiledBlock(nn.Module):
    """One region: calls the block itself, its generic or its special compiled version."""

    def __init__(self, block: nn.Module, compile_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.block = block
        # plain attributes, not submodules: the parameters stay registered once, under `block`
        self.__dict__["_versions"] = {
            Variant.GENERIC: torch.compile(block, dynamic=True, **compile_kwargs),
            Variant.SPECIAL: torch.compile(block, dynamic=False, **compile_kwargs),
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        variant = _current()
        if variant is Variant.EAGER:
            return self.block(*args, **kwargs)
        return self.__dict__["_versions"][variant](*args, **kwargs)


def region_classes(module: nn.Module) -> tuple[str, ...]:
    return (*getattr(module, "_repeated_blocks", ()), *EXTRA_REGIONS)


def wrap_regions(module: nn.Module, compile_kwargs: dict[str, Any]) -> int:
    """Wrap every block of `module` whose class is a region in a CompiledBlock, in place (outermost only)."""
    names = set(region_classes(module))
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for child_name, child in list(parent.named_children()):
            if isinstance(child, CompiledBlock):
                continue
            if type(child).__name__ in names:
                setattr(parent, child_name, CompiledBlock(child, compile_kwargs))
                count += 1
            else:
                visit(child)

    visit(module)
    return count


def shape_key(inputs: dict[str, torch.Tensor]) -> ShapeKey:
    return tuple(sorted((name, tuple(t.shape)) for name, t in inputs.items()))


@dataclass
class RegionStats:
    """What compiling cost, for logs and benchmarks."""

    generic_compile_s: float = 0.0
    special_compile_s: dict[str, float] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)  # variant -> calls


class Regions:
    """The compiled regions of one stage and the specialization policy over them."""

    def __init__(self, module: nn.Module, specialization: Specialization, compile_kwargs: dict[str, Any]):
        self.module = module
        self.specialization = specialization
        self.count = wrap_regions(module, compile_kwargs)
        self.stats = RegionStats()
        self._generic_ready = False
        self._special: dict[ShapeKey, str] = {}  # key -> "compiling" | "ready" | "failed"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending: dict[ShapeKey, tuple[dict[str, torch.Tensor], Callable[..., Any]]] = {}
        self.last: tuple[ShapeKey, Variant] | None = None

    def is_special(self, key: ShapeKey) -> bool:
        return self._special.get(key) == "ready"

    def run(self, inputs: dict[str, torch.Tensor], call: Callable[[dict[str, torch.Tensor]], Any]) -> Any:
        """`call(inputs)` with the regions set to the variant chosen for these shapes."""
        key = shape_key(inputs)
        variant = self._choose(key, inputs, call)
        self.last = (key, variant)
        self.stats.served[variant] = self.stats.served.get(variant, 0) + 1
        start = time.perf_counter()
        if variant is Variant.SPECIAL and not self.is_special(key):  # eager: block once for this shape
            self._compile_special(key, inputs, call)
            if not self.is_special(key):
                variant = Variant.GENERIC
        result = _run_as(variant, call, inputs)
        if variant is Variant.GENERIC and not self._generic_ready:
            self._generic_ready = True
            self.stats.generic_compile_s = time.perf_counter() - start
            logger.info("compiled %d generic regions in %.1f s", self.count, self.stats.generic_compile_s)
        return result

    def _choose(self, key: ShapeKey, inputs: dict[str, torch.Tensor], call: Callable[..., Any]) -> Variant:
        if self.specialization is Specialization.NONE or self.is_special(key):
            return Variant.SPECIAL if self.is_special(key) else Variant.GENERIC
        if self.specialization is Specialization.EAGER:
            return Variant.GENERIC if self._special.get(key) == "failed" else Variant.SPECIAL
        # lazy: the first call at a shape never waits for a compile; the specialization starts after the
        # request (start_pending), in the background
        if self._generic_ready and key not in self._special and key not in self._pending:
            self._pending[key] = ({k: v.clone() for k, v in inputs.items()}, call)
        return Variant.GENERIC

    def start_pending(self) -> None:
        """Start the background specializations asked for by lazy calls (after a request is served)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            for key, (inputs, call) in pending.items():
                if key in self._special:
                    continue
                self._special[key] = "compiling"
                thread = threading.Thread(
                    target=self._compile_special,
                    args=(key, inputs, call, True),
                    name="specialize",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _compile_special(
        self,
        key: ShapeKey,
        inputs: dict[str, torch.Tensor],
        call: Callable[..., Any],
        background: bool = False,
    ) -> None:
        if self._special.get(key) in ("ready", "failed"):
            return
        start = time.perf_counter()
        try:
            device = next(iter(inputs.values())).device if inputs else torch.device("cpu")
            if background and device.type == "cuda":
                # never while a CUDA graph is being captured: work on another stream would invalidate it
                with GPU_WORK_LOCK:
                    stream = torch.cuda.Stream(device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.inference_mode(), torch.cuda.stream(stream):
                        _run_as(Variant.SPECIAL, call, inputs)
                    stream.synchronize()
            else:
                with torch.inference_mode():
                    _run_as(Variant.SPECIAL, call, inputs)
        except Exception as e:  # a failed specialization costs speed, never the request
            logger.warning("shape-specialized compile failed (%s); staying on generic kernels", e)
            self._special[key] = "failed"
            return
        seconds = time.perf_counter() - start
        self.stats.special_compile_s[_describe(key)] = seconds
        self._special[key] = "ready"
        logger.info(
            "specialized kernels ready for %s in %.1f s%s",
            _describe(key),
            seconds,
            " (background)" if background else "",
        )

    def wait(self, timeout: float | None = None) -> None:
        """Wait for background specializations (for benchmarks and tests)."""
        for thread in list(self._threads):
            thread.join(timeout)


def _run_as(variant: Variant, call: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> Any:
    previous = _current()
    _local.variant = variant
    try:
        return call(inputs)
    finally:
        _local.variant = previous


def _describe(key: ShapeKey) -> str:
    return ",".join(f"{name}{list(shape)}" for name, shape in key)


def configure_dynamo() -> None:
    """Room for one compiled entry per shape and block class."""
    cfg = torch._dynamo.config
    # A lazy specialization traces in a background thread, and FX's "tracing now" flag is process-wide: a
    # compiled call made meanwhile on the request's thread must run eager instead of raising.
    cfg.error_on_nested_fx_trace = False
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
