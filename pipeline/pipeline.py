"""`Pipeline`: prompt -> text encoders -> denoising loop -> VAE decoder -> images, through engines.

Read `__call__` top to bottom: it is the whole algorithm. Family-specific math (FLUX vs Stable Diffusion)
lives in pipeline/families/, the scheduler arithmetic in schedule.py, the loop's buffers in denoise.py, and
how each stage runs (TensorRT-RTX or torch) in pipeline/engines/.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import ModelCache
from .denoise import DenoiseState, final_latents, make_step
from .engines import Backend, choose_backend, create_backend
from .errors import InvalidInputError
from .families import Family, family_for
from .families.base import Tensors
from .loading import ModelSource, resolve_model
from .options import parse_device, parse_dtype
from .schedule import plan_schedule

logger = logging.getLogger("pipeline")

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineOutput:
    """`images`: PIL images, an N x H x W x 3 float array in [0, 1] ("np"), or latents ("latent")."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the resolved height, width, steps, guidance


def check_request(
    family: Family, height: int, width: int, steps: int, per_prompt: int, output_type: str
) -> None:
    """Raise InvalidInputError for a request the family cannot serve (before any work is done)."""
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


class Pipeline:
    """A text-to-image pipeline whose every stage runs through an engine of the chosen backend."""

    def __init__(self, source: ModelSource, family: Family, backend: Backend) -> None:
        self.source = source
        self.family = family
        self.backend = backend
        self.device = backend.device
        self.dtype = backend.dtype
        self.progress = True
        self.model_cache: ModelCache | None = None  # where this model's ONNX, engines and caches live
        # One CUDA stream for every engine and torch op of a call (never the legacy default stream, which
        # makes TensorRT synchronize around each call and forbids graph capture).
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | ModelSource,
        *,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        **backend_options: Any,
    ) -> Pipeline:
        """Load `model` (a diffusers folder, a hub id, or 'tiny-flux' / 'tiny-sd') onto `backend`.

        backend: "auto" (rtx where TensorRT-RTX runs, else torch), "rtx" or "torch".
        backend_options: compile, cuda_graphs, specialization ("lazy"|"eager"|"none"), precision; rtx also
        vram_budget (GB), low_vram, build (build missing engines first; otherwise EnginesNotBuiltError names
        the command). See pipeline/engines/rtx_backend.py.
        """
        cache_dir = Path(cache_dir) if cache_dir is not None else None
        source = (
            model
            if isinstance(model, ModelSource)
            else resolve_model(model, cache_dir=cache_dir, local_files_only=local_files_only)
        )
        family = family_for(source)
        dev = parse_device(device)
        torch_dtype = parse_dtype(dtype, dev, family)
        name = choose_backend(backend, dev)
        model_cache = ModelCache.for_model(source, name, dev, cache_dir)
        engine_backend = create_backend(
            name, family, dev, torch_dtype, cache_dir=cache_dir, model_cache=model_cache, **backend_options
        )
        logger.info(
            "%s (%s) on %s, %s, backend %s",
            source.model_id,
            family.name,
            dev,
            torch_dtype,
            engine_backend.describe(),
        )
        pipe = cls(source, family, engine_backend)
        pipe.model_cache = model_cache
        return pipe

    # ---- the call ---------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        max_sequence_length: int = 512,
    ) -> PipelineOutput:
        """Generate images for `prompt` (a string or a list), with diffusers' argument names and defaults
        taken from the model (size, steps, guidance). `seed` is used when no `generator` is given."""
        with self._on_stream():
            family = self.family
            prompts, negatives = self._check_prompts(prompt, negative_prompt)
            height = family.default_size if height is None else height
            width = family.default_size if width is None else width
            steps = num_inference_steps if num_inference_steps is not None else family.default_steps
            guidance = guidance_scale if guidance_scale is not None else family.default_guidance
            check_request(family, height, width, steps, num_images_per_prompt, output_type)
            batch = len(prompts) * num_images_per_prompt
            if generator is None:
                seed = seed if seed is not None else random.randrange(2**63)
                generator = torch.Generator("cpu").manual_seed(seed)
            timings: dict[str, float] = {}
            clock = time.perf_counter()

            # 1. encode the prompt
            text = family.encode_prompt(
                self._run_stage,
                prompts,
                negatives,
                guidance,
                num_images_per_prompt,
                max_sequence_length=max_sequence_length,
            )
            clock = self._lap(timings, "text_encoders", clock)

            # 2. initial noise, drawn as diffusers draws it
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(
                family.latent_shape(batch, height, width),
                generator=generator,
                device=self.device,
                dtype=self.dtype,
            )
            x0 = family.pack_latents(noise, height, width)

            # 3. the schedule as coefficient tables (schedule.py), then the loop over static buffers
            schedule = plan_schedule(
                self.source.scheduler,
                steps,
                begin_index=family.schedule_begin_index,
                **family.schedule_kwargs(height, width, steps),
            )
            cond = family.denoiser_conditioning(text, height, width, batch, guidance)
            state = DenoiseState.create(family, schedule, x0, cond, guidance, self.dtype)
            denoiser = self.backend.engines[family.denoiser]
            with tqdm(total=state.num_steps, desc="denoising", disable=not self.progress, leave=False) as bar:
                state = self.backend.denoise(
                    state, lambda s: make_step(family, denoiser, s, self.dtype), bar.update
                )
            latents = final_latents(state, self.dtype)
            clock = self._lap(timings, "denoise", clock)

            # 4. decode
            if output_type == "latent":
                images: Any = latents
            else:
                latent = family.decoder_input(latents, height, width).to(self.dtype)
                decoded = self._run_stage("vae_decoder", {"latent": latent})["sample"]
                array = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
                images = array if output_type == "np" else _to_pil(array)
            self._lap(timings, "vae_decoder", clock)
            timings["total"] = sum(timings.values())
            settings = {
                "height": height,
                "width": width,
                "num_inference_steps": steps,
                "guidance_scale": guidance,
            }
            return PipelineOutput(images=images, timings=timings, seed=seed, settings=settings)

    # ---- helpers ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Inference mode, on the pipeline's own CUDA stream where there is one."""
        with torch.inference_mode():
            if self.stream is None:
                yield
            else:
                with torch.cuda.stream(self.stream):
                    yield

    def _run_stage(self, stage: str, inputs: Tensors) -> Tensors:
        spec = self.family.stages[stage]
        moved = {}
        for t in spec.inputs:
            if t.name in inputs:
                moved[t.name] = inputs[t.name].to(self.device, t.torch_dtype(self.dtype))
        return self.backend.engines[stage](**moved)

    def _lap(self, timings: dict[str, float], name: str, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        timings[name] = now - since
        return now

    def _check_prompts(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None
    ) -> tuple[list[str], list[str] | None]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompt must be a string or a non-empty list of strings")
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

    # ---- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Save the backend's runtime / compile cache. The pipeline stays usable."""
        self.backend.close()

    def save_cache(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_pil(array: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray((img * 255).round().astype("uint8")) for img in array]
