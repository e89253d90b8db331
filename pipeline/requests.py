"""What a call may ask for: the checks that run before any work, in the library's words (InvalidInputError).

`Pipeline.__call__` and the CLI (and the server, before a request is queued) run these on the arguments
alone, so bad input costs nothing.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from .errors import InvalidInputError
from .families import Family
from .options import check_seed, parse_dtype

logger = logging.getLogger("pipeline")

OUTPUT_TYPES = ("pil", "np", "latent")


def check_request(
    family: Family,
    height: int,
    width: int,
    steps: int,
    per_prompt: int,
    output_type: str,
    guidance_scale: float = 0.0,
    max_sequence_length: int | None = None,
) -> None:
    """Raise InvalidInputError for a request the family cannot serve (before any work is done)."""
    check_number("guidance_scale", guidance_scale)
    limit = family.max_text_tokens
    if limit is not None and max_sequence_length is not None:
        if not _is_int(max_sequence_length) or not 1 <= max_sequence_length <= limit:
            raise InvalidInputError(
                f"max_sequence_length must be a whole number from 1 to {limit} (the most tokens "
                f"{family.name}'s text encoder reads), got {max_sequence_length!r}"
            )
    g = family.granularity
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % g:
            raise InvalidInputError(
                f"{name} {value} is not a positive multiple of {g} ({family.name} needs multiples of {g})"
            )
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"num_inference_steps must be at least 1, got {steps}")
    if not isinstance(per_prompt, int) or per_prompt < 1:
        raise InvalidInputError(f"num_images_per_prompt must be at least 1, got {per_prompt}")
    if output_type not in OUTPUT_TYPES:
        raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value: Any) -> None:
    """InvalidInputError unless `value` is a real number (bools and strings are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInputError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def make_generators(
    generator: torch.Generator | list[torch.Generator] | None, seed: int | None, batch: int
) -> tuple[torch.Generator | list[torch.Generator], list[int] | None]:
    """The generator(s) a call draws its noise with, and each image's seed where we chose them.

    Given no generator, image i of the batch gets its own `torch.Generator().manual_seed(seed + i)` (diffusers
    takes one generator per image), so image i alone is `seed=seed + i`. A list must have one generator per
    image, as in diffusers."""
    if generator is None:
        if seed is None:
            seed = random.randrange(2**63)
        check_seed(seed, batch)
        seeds = [seed + i for i in range(batch)]
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
    if isinstance(generator, list):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise InvalidInputError(
                f"got a list of {len(generator)} generators for {batch} images; give one torch.Generator "
                "per image (len(prompts) x num_images_per_prompt), or a single one"
            )
        return generator, None
    if not isinstance(generator, torch.Generator):
        raise InvalidInputError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
    return generator, None


def check_prompts(
    prompt: str | list[str], negative_prompt: str | list[str] | None
) -> tuple[list[str], list[str] | None]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError("prompt must be a string or a non-empty list of strings")
    blank = sum(1 for p in prompts if not p.strip())
    if blank:  # as in diffusers: allowed, an image the text does not steer
        which = "the prompt is" if len(prompts) == 1 else f"{blank} of {len(prompts)} prompts are"
        logger.warning("%s blank: the image will not follow any text", which)
    if negative_prompt is None:
        return prompts, None
    negatives = (
        [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    )
    if len(negatives) != len(prompts):
        raise InvalidInputError(
            f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt"
        )
    return prompts, negatives


def one_dtype(dtype: str | torch.dtype | None, torch_dtype: str | torch.dtype | None) -> Any:
    """`dtype` and diffusers' spelling `torch_dtype` are one knob: either, or both when they agree."""
    if torch_dtype is None:
        return dtype
    cpu = torch.device("cpu")
    if dtype is not None and parse_dtype(dtype, cpu) != parse_dtype(torch_dtype, cpu):
        raise InvalidInputError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    return torch_dtype
