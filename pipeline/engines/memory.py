"""GPU memory of the rtx backend: the plan checked before anything loads, and the one activation buffer.

**The plan** is a pure function of each engine's `<stage>.json` (weights, activations, precision, whether it
streams weights; written at build time, see pipeline/export/engines.py) and a number of free bytes, so it can
be checked, and tested, without a GPU. Stages run one after another, so:

    peak = weights on the GPU + the largest stage's activations (one shared buffer) + a reserve

The weights on the GPU depend on the residency: every engine resident (fastest), or `low_vram`, where each
stage's weights come onto the GPU for its turn only (text encoders, then the denoiser, then the VAE decoder;
TensorRT-RTX's deferred weight loading), so the peak holds the largest stage alone. A denoiser built with
WEIGHT_STREAMING keeps only a budget of its weights on the GPU and streams the rest from host memory each
step; the budget is what is left of the VRAM budget after everything else. A plan that cannot fit is refused
with one line naming the fix (fp8 engines, low VRAM, a budget, a smaller --max-size) before any CUDA
out-of-memory error can happen.

**The activation buffer** (`SharedDeviceMemory`) is one device allocation that every execution context uses
(USER_MANAGED allocation strategy), sized to the largest `device_memory_size_v2`: NVIDIA's demo does the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch

from ..errors import InsufficientMemoryError

logger = logging.getLogger(__name__)

GB = 1e9
# Not in any engine: the CUDA context and TensorRT-RTX's runtime (~0.5 GB), its JIT workspace, torch's tensors
# of one call (latents, text embeddings, the decoded images) and the allocator's slack.
RESERVE_BYTES = 1_000_000_000
# A streaming engine also needs scratch to stage the weights it streams; the build cannot report it without a
# GPU, so the plan reserves room for two of the engine's largest weight tensors (double buffering).
STREAMING_SCRATCH_TENSORS = 2


class Residency(StrEnum):
    """Which engines' weights are on the GPU while a stage runs."""

    RESIDENT = "resident"  # every stage's weights, all the time (fastest)
    LOW_VRAM = "low-vram"  # one stage group at a time: text encoders, then denoiser, then VAE decoder


@dataclass(frozen=True)
class StagePlan:
    """One engine's part of the plan, from its `<stage>.json`."""

    stage: str
    precision: str
    weight_bytes: int
    activation_bytes: int
    weight_streaming: bool
    largest_weight_bytes: int = 0

    @classmethod
    def from_metadata(cls, stage: str, meta: Mapping[str, Any]) -> StagePlan:
        return cls(
            stage=stage,
            precision=str(meta.get("precision", "unknown")),
            weight_bytes=int(meta.get("weight_bytes") or meta.get("engine_bytes") or 0),
            activation_bytes=int(meta.get("activation_bytes") or 0),
            weight_streaming=bool(meta.get("weight_streaming", False)),
            largest_weight_bytes=int(meta.get("largest_weight_bytes") or 0),
        )


@dataclass(frozen=True)
class Placement:
    """What a plan puts on the GPU for a given VRAM budget: the peak, and the denoiser's streaming budget
    (None: all its weights stay on the GPU)."""

    peak_bytes: int
    vram_budget: int
    denoiser_budget: int | None
    residency: Residency

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.vram_budget

    @property
    def streams(self) -> bool:
        return self.denoiser_budget is not None


@dataclass(frozen=True)
class MemoryPlan:
    """The engines of one pipeline and how much GPU memory they need, before any of them loads."""

    stages: tuple[StagePlan, ...]
    denoiser: str
    groups: tuple[tuple[str, ...], ...]  # stages that run together, in call order (low VRAM loads a group)
    model: str = "the model"

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, Mapping[str, Any]],
        denoiser: str,
        decoder: str = "vae_decoder",
        model: str = "the model",
    ) -> MemoryPlan:
        stages = tuple(StagePlan.from_metadata(name, meta) for name, meta in metadata.items())
        text = tuple(s.stage for s in stages if s.stage not in (denoiser, decoder))
        groups = tuple(g for g in (text, (denoiser,), (decoder,)) if g and all(n in metadata for n in g))
        return cls(stages, denoiser, groups, model)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    @property
    def activation_bytes(self) -> int:
        """The shared activation buffer: the largest stage's."""
        return max((s.activation_bytes for s in self.stages), default=0)

    def _weights(self, names: Sequence[str], denoiser_budget: int | None) -> int:
        total = 0
        for s in self.stages:
            if s.stage not in names:
                continue
            if s.stage == self.denoiser and denoiser_budget is not None:
                total += min(denoiser_budget, s.weight_bytes)
                total += STREAMING_SCRATCH_TENSORS * s.largest_weight_bytes
            else:
                total += s.weight_bytes
        return total

    def peak_bytes(self, residency: Residency, denoiser_budget: int | None = None) -> int:
        """GPU memory at the busiest moment of a call (None: the denoiser keeps all its weights on the GPU)."""
        if residency is Residency.RESIDENT:
            weights = self._weights([s.stage for s in self.stages], denoiser_budget)
        else:
            weights = max((self._weights(g, denoiser_budget) for g in self.groups), default=0)
        return weights + self.activation_bytes + RESERVE_BYTES

    def place(self, vram_budget: int, residency: Residency = Residency.RESIDENT) -> Placement:
        """The placement for a VRAM budget: everything on the GPU where it fits, else the largest denoiser
        streaming budget that fits (if its engine streams), else the smallest peak it can have."""
        full = self.peak_bytes(residency)
        denoiser = self.stage(self.denoiser)
        if full <= vram_budget or not denoiser.weight_streaming:
            return Placement(full, vram_budget, None, residency)
        if self.peak_bytes(residency, 0) > vram_budget:
            return Placement(self.peak_bytes(residency, 0), vram_budget, 0, residency)
        lo, hi = 0, denoiser.weight_bytes  # the largest budget whose peak fits (the peak grows with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.peak_bytes(residency, mid) <= vram_budget else (lo, mid - 1)
        budget = lo
        return Placement(self.peak_bytes(residency, budget), vram_budget, budget, residency)

    def check(
        self, free_bytes: int, *, vram_budget: int | None = None, residency: Residency = Residency.RESIDENT
    ) -> Placement:
        """The placement for this GPU, or InsufficientMemoryError naming the fix. Pure: no GPU is touched.

        `free_bytes`: the GPU's free memory now; `vram_budget`: what the pipeline may use (default: the
        free memory).
        """
        where = f"{free_bytes / GB:.1f} GB free"
        if vram_budget is None:
            vram_budget = free_bytes
        elif vram_budget > free_bytes:
            raise InsufficientMemoryError(
                f"--vram-budget {vram_budget / GB:.1f} GB is more than the GPU has ({where}); "
                f"give at most --vram-budget {free_bytes / GB:.1f}"
            )
        else:
            where = f"a --vram-budget of {vram_budget / GB:.1f} GB"
        placement = self.place(vram_budget, residency)
        if placement.fits:
            if placement.streams and residency is Residency.RESIDENT:
                low = self.place(vram_budget, Residency.LOW_VRAM)
                if low.fits and not low.streams:
                    logger.info("%s: --low-vram would keep all the denoiser's weights on the GPU", self.model)
            if placement.streams:
                logger.info(
                    "%s: streaming the denoiser's weights, %.1f of %.1f GB on the GPU (peak %.1f GB of %.1f)",
                    self.model,
                    (placement.denoiser_budget or 0) / GB,
                    self.stage(self.denoiser).weight_bytes / GB,
                    placement.peak_bytes / GB,
                    vram_budget / GB,
                )
            return placement
        raise InsufficientMemoryError(
            f"{self.model} needs at least {placement.peak_bytes / GB:.1f} GB of GPU memory with these engines "
            f"({self.describe_short()}), and {where}: {self.fix(vram_budget, residency)}"
        )

    def describe_short(self) -> str:
        d = self.stage(self.denoiser)
        return (
            f"{d.stage} {d.precision} {d.weight_bytes / GB:.1f} GB"
            f"{', streamable' if d.weight_streaming else ''}, activations {self.activation_bytes / GB:.1f} GB"
        )

    def fix(self, vram_budget: int, residency: Residency) -> str:
        """The first change that makes the plan fit `vram_budget`, in words a user acts on.

        In the order that costs the least speed: fp8 engines (half the denoiser's weights, faster), then
        low VRAM (stages take turns on the GPU), then weight streaming (the denoiser's weights cross PCIe
        every step), then a smaller maximum size (less activation memory).
        """
        d = self.stage(self.denoiser)
        candidates: list[tuple[MemoryPlan, str]] = []
        if d.precision != "fp8":
            factor = 0.25 if d.precision == "fp32" else 0.5
            fp8 = replace(
                d,
                precision="fp8",
                weight_bytes=int(d.weight_bytes * factor),
                largest_weight_bytes=int(d.largest_weight_bytes * factor),
            )
            candidates.append(
                (
                    self._with_denoiser(fp8),
                    "build fp8 engines (python -m pipeline --build-engines --precision fp8)",
                )
            )
        candidates.append((self, ""))
        if not d.weight_streaming:
            candidates.append(
                (
                    self._with_denoiser(replace(d, weight_streaming=True)),
                    "rebuild the engines with weight streaming (python -m pipeline --build-engines)",
                )
            )
        for plan, words in candidates:
            for mode in dict.fromkeys((residency, Residency.LOW_VRAM)):
                if plan.place(vram_budget, mode).fits:
                    low = "use --low-vram (each stage's weights on the GPU only for its turn)"
                    if mode is residency:
                        return words or low
                    return f"{words} and {low}" if words else low
        return (
            f"rebuild the engines with a smaller --max-size (activations take {self.activation_bytes / GB:.1f} "
            "GB at the largest size), or use a GPU with more memory"
        )

    def _with_denoiser(self, denoiser: StagePlan) -> MemoryPlan:
        stages = tuple(denoiser if s.stage == self.denoiser else s for s in self.stages)
        return replace(self, stages=stages)

    def lines(self, vram_sizes: Sequence[float] = (16, 24, 32)) -> list[str]:
        """The plan in words, per stage and for cards of the given sizes (GB): what `--cache-info` shows."""
        out = []
        for s in self.stages:
            out.append(
                f"{s.stage}: {s.precision}, weights {s.weight_bytes / GB:.2f} GB"
                f"{' (streamable)' if s.weight_streaming else ''}, activations {s.activation_bytes / GB:.2f} GB"
            )
        for gb in vram_sizes:
            out.append(f"{gb:g} GB card: {self.summary(int(gb * GB))}")
        return out

    def summary(self, vram_budget: int) -> str:
        """One line: how this plan best runs within `vram_budget`, preferring no streaming (a streamed weight
        crosses PCIe every step), then the most weights kept on the GPU, then all resident (low VRAM reloads
        the text encoders once per call)."""
        placements = [self.place(vram_budget, r) for r in Residency]
        fitting = [p for p in placements if p.fits]
        if not fitting:
            return f"does not fit: {self.fix(vram_budget, Residency.LOW_VRAM)}"
        # no streaming first; among streaming ones, the most weights on the GPU; then all resident
        best = min(
            fitting, key=lambda p: (p.streams, -(p.denoiser_budget or 0), p.residency is Residency.LOW_VRAM)
        )
        mode = "all resident" if best.residency is Residency.RESIDENT else "--low-vram"
        stream = (
            f", denoiser streams ({(best.denoiser_budget or 0) / GB:.1f} GB of its weights on the GPU)"
            if best.streams
            else ""
        )
        return f"fits, {mode}{stream}, peak {best.peak_bytes / GB:.1f} GB"


@dataclass
class SharedDeviceMemory:
    """ONE activation buffer for every execution context of a pipeline (stages run one after another).

    Contexts are created with the USER_MANAGED allocation strategy and given this buffer with
    `IExecutionContext.set_device_memory`; it is sized to the largest `device_memory_size_v2` it was asked
    for and grows (rebinding every context) if a later engine needs more.
    """

    device: torch.device
    _buffer: torch.Tensor | None = None
    _contexts: list[Any] = field(default_factory=list)

    @property
    def size(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.numel())

    def reserve(self, nbytes: int) -> None:
        """Make the buffer at least `nbytes` (one allocation; contexts are rebound when it grows)."""
        if nbytes <= self.size:
            return
        if self._buffer is not None:  # work queued on the old buffer finishes before it is freed
            torch.cuda.current_stream(self.device).synchronize()
        self._buffer = None
        # torch's allocator aligns blocks to 512 bytes; TensorRT needs 256
        self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        logger.info("shared activation buffer: %.2f GB on %s", nbytes / GB, self.device)
        for context in self._contexts:
            self._set(context)

    def bind(self, context: Any, nbytes: int) -> None:
        """Give `context` (created with USER_MANAGED allocation) the shared buffer, grown to `nbytes`."""
        self.reserve(nbytes)
        self._contexts.append(context)
        self._set(context)

    def unbind(self, context: Any) -> None:
        self._contexts = [c for c in self._contexts if c is not context]

    def _set(self, context: Any) -> None:
        assert self._buffer is not None
        context.set_device_memory(self._buffer.data_ptr(), self._buffer.numel())

    def close(self) -> None:
        self._contexts.clear()
        self._buffer = None
