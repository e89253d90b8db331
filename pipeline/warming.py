"""`Pipeline.warm_up`: one throw-away call per size, with as few steps as leave what a real call needs.

What a new size costs its first call is set-up made for that size alone and kept for the process: compiled
code for a shape class it has not met, the denoising step's CUDA graph, and cuDNN's plans per convolution and
attention shape (0.3-0.9 s for SD 1.5 at 768²; docs/benchmarks.md, "SD's new-size penalty"). All of it is made by the
first two steps of a call: step 0 runs for real (plans, lazy set-up), step 1 is captured. The graph is built
for a schedule length (`denoise.step_capacity`: 64 for every count from 1 to 64), so a 2-step warm-up leaves
the graph a 28- or 50-step call replays, and the warm-up costs two steps instead of a whole call. Where the
two lengths differ (more steps than 64, latents too large to pad, or no graphs: each step count then has
buffers of its own length), the warm-up runs the default steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .schedule import Schedule

if TYPE_CHECKING:
    from .pipeline import Pipeline

logger = logging.getLogger("pipeline")

WARM_UP_STEPS = 2  # step 0 runs for real, step 1 is captured: the fewest steps that leave the graph


def warm_up_steps(pipe: Pipeline, height: int, width: int, num_images: int = 1) -> int:
    """The fewest steps whose call leaves what a call at the model's default steps needs."""
    default = pipe.family.default_steps
    few = min(WARM_UP_STEPS, default)
    plans = [pipe.plan_schedule(height, width, steps) for steps in (few, default)]
    if not all(isinstance(plan, Schedule) for plan in plans):
        return few  # a scheduler's own step: only the denoiser call is graphed, per shape, whatever the steps
    row_bytes = math.prod(pipe.family.latent_shape(num_images, height, width)) * 4  # float32 history rows
    capacities = {pipe.backend.step_capacity(plan.num_evaluations, row_bytes) for plan in plans}
    return few if len(capacities) == 1 else default


def size_label(width: int, height: int, num_images: int = 1) -> str:
    """'768x512', or '768x512 (2 images)' for a batch."""
    return f"{width}x{height}" + (f" ({num_images} images)" if num_images > 1 else "")


def warm_up(
    pipe: Pipeline,
    sizes: Sequence[tuple[int, int]] | None = None,
    num_inference_steps: int | None = None,
    num_images_per_prompt: int = 1,
) -> dict[str, float]:
    """What `Pipeline.warm_up` does (its docstring says it); returns the seconds each size took."""
    progress, pipe.progress = pipe.progress, False
    spent: dict[str, float] = {}
    try:
        for width, height in sizes or [(pipe.family.default_size, pipe.family.default_size)]:
            start = time.perf_counter()
            steps = num_inference_steps or warm_up_steps(pipe, height, width, num_images_per_prompt)
            pipe(
                "",
                height=height,
                width=width,
                num_inference_steps=steps,
                num_images_per_prompt=num_images_per_prompt,
                seed=0,
                output_type="np",
            )
            label = size_label(width, height, num_images_per_prompt)
            spent[label] = round(time.perf_counter() - start, 3)
            logger.info("warmed up %s in %.2f s (%d steps)", label, spent[label], steps)
    finally:
        pipe.progress = progress
    return spent
