"""`Pipeline`: prompt -> text encoders -> denoising loop -> VAE decoder -> images, through engines.

Read `__call__` top to bottom: it is the whole algorithm. Family-specific math (FLUX, SD, SDXL) lives in
pipeline/families/, the choice of scheduler in schedulers.py, how a run of it is planned (tables or its own
step) in schedule.py, the two loops in denoise.py, and how each stage runs (TensorRT-RTX or torch) in
pipeline/engines/.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import ModelCache
from .denoise import denoise_with_scheduler, denoise_with_tables
from .engines import Backend, choose_backend, create_backend
from .families import Family, family_for
from .families.base import Tensors
from .loading import ModelSource, resolve_model
from .lora.methods import LoraMethods
from .options import dtype_name, parse_device, parse_dtype
from .requests import check_prompts, check_request, make_generators, one_dtype
from .schedule import Schedule, SchedulerSteps, plan_schedule
from .schedulers import build_scheduler, check_scheduler

if TYPE_CHECKING:
    from .lora import LoraAdapters

logger = logging.getLogger("pipeline")


@dataclass
class PipelineOutput:
    """`images`: PIL images, an N x H x W x 3 float array in [0, 1] ("np"), or latents ("latent")."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None  # image i was drawn with seed + i (None when the caller gave generators)
    settings: dict[str, Any] = field(default_factory=dict)  # the resolved height, width, steps, guidance
    seeds: list[int] | None = None  # each image's own seed: `seed=seeds[i]` alone gives image i again


class Pipeline(LoraMethods):
    """A text-to-image pipeline whose every stage runs through an engine of the chosen backend (LoRA methods
    with diffusers' names: pipeline/lora/methods.py)."""

    def __init__(
        self,
        source: ModelSource,
        family: Family,
        backend: Backend,
        scheduler: Any = None,
        model_scheduler: Any = None,
    ) -> None:
        self.source = source
        self.family = family
        self.backend = backend
        # the model's scheduler as the family's diffusers pipeline adopts it; class names build from its config
        if model_scheduler is None:
            model_scheduler = family.adopt_scheduler(source.scheduler)
        self.model_scheduler = model_scheduler
        self._scheduler = scheduler if scheduler is not None else self.model_scheduler
        self.device = backend.device
        self.dtype = backend.dtype
        self.progress = True
        self.model_cache: ModelCache | None = None  # where this model's ONNX, engines and caches live
        self._num_timesteps = 0
        # One CUDA stream for every engine and torch op of a call (never the legacy default stream, which
        # makes TensorRT synchronize around each call and forbids graph capture).
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lora: LoraAdapters | None = None

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
        scheduler: Any = None,
        torch_dtype: str | torch.dtype | None = None,
        **backend_options: Any,
    ) -> Pipeline:
        """Load `model` (a diffusers folder, a hub id, or 'tiny-flux' / 'tiny-sd' / 'tiny-sdxl') onto `backend`.

        backend: "auto" (rtx where TensorRT-RTX runs, else torch), "rtx" or "torch".
        dtype (or `torch_dtype`, as diffusers spells it): the weights' dtype, "fp32" | "fp16" | "bf16" or a
            torch dtype; default float32 on CPU, the family's GPU dtype on CUDA.
        scheduler: a diffusers scheduler instance, or the class name of one of the model's compatible
            schedulers (built with `from_config` on the model's scheduler config); default the model's own.
            Checked before any weights load, as is the model's own.
        backend_options: compile, cuda_graphs, specialization ("none"|"eager"; "lazy" on rtx), precision
            ("fp8": the denoiser's large Linear layers in float8, what a dtype cannot say); rtx also
            vram_budget (GB), low_vram, build (build missing engines first; otherwise EnginesNotBuiltError
            names the command). See pipeline/engines/rtx_backend.py.
        """
        dtype = one_dtype(dtype, torch_dtype)
        cache_dir = Path(cache_dir) if cache_dir is not None else None
        source = (
            model
            if isinstance(model, ModelSource)
            else resolve_model(model, cache_dir=cache_dir, local_files_only=local_files_only)
        )
        family = family_for(source)
        # given at construction, as diffusers' pipeline adopts it; checked before any weights load
        model_scheduler = family.adopt_scheduler(source.scheduler)
        chosen = family.adopt_scheduler(build_scheduler(scheduler, model_scheduler))
        loop = check_scheduler(chosen, family)
        dev = parse_device(device)
        weights_dtype = parse_dtype(dtype, dev, family)
        name = choose_backend(backend, dev)
        model_cache = ModelCache.for_model(source, name, dev, cache_dir)
        model_cache.sweep_leftovers()
        engine_backend = create_backend(
            name, family, dev, weights_dtype, cache_dir=cache_dir, model_cache=model_cache, **backend_options
        )
        if dev.type == "cuda":  # weights and fp8 quantization were enqueued on the loading stream
            torch.cuda.synchronize(dev)
        logger.info(
            "%s (%s) on %s, weights %s, backend %s; scheduler %s",
            source.model_id,
            family.name,
            dev,
            dtype_name(engine_backend.dtype),
            engine_backend.describe(),
            loop,
        )
        pipe = cls(source, family, engine_backend, chosen, model_scheduler)
        pipe.model_cache = model_cache
        return pipe

    @property
    def scheduler(self) -> Any:
        """The diffusers scheduler each call plans from (copied per call, never changed by a call).
        `scheduler.compatibles` lists the classes that can replace it."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        """A diffusers scheduler instance (used as given, as diffusers' pipelines do), its class, or a
        compatible class name (built with `from_config` on the model's scheduler config); raises
        InvalidInputError for one this model cannot run, and keeps the one it had."""
        chosen = build_scheduler(value, self.model_scheduler)
        logger.info("scheduler %s", check_scheduler(chosen, self.family))
        self._scheduler = chosen

    def __repr__(self) -> str:
        return (
            f"Pipeline(model={self.source.model_id!r}, family={self.family.name!r}, device={str(self.device)!r}, "
            f"dtype={self.dtype}, backend={self.backend.describe()!r})"
        )

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
        callback_on_step_end: Callable[[Pipeline, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
        guidance_rescale: float | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ) -> PipelineOutput:
        """Generate images for `prompt` (a string or a list), with diffusers' argument names and defaults
        taken from the model (size, steps, guidance). `seed` is used when no `generator` is given; a list of
        generators gives one per image, as in diffusers.

        `callback_on_step_end(pipe, step_index, timestep, {})` runs after each denoising step, as in diffusers
        (`pipe.num_timesteps` says how many there are; no tensor inputs are offered and what it returns is
        ignored). It adds no host sync: on CUDA it runs when the step has been queued, not finished.

        The arguments after `callback_on_step_end` are those of some families only (SDXL: all of them; SD:
        guidance_rescale); None means diffusers' default. Giving one the model's family does not use is an
        error."""
        with self._on_stream() as caller:
            family = self.family
            prompts, negatives = check_prompts(prompt, negative_prompt)
            given = {
                "guidance_rescale": guidance_rescale,
                "prompt_2": prompt_2,
                "negative_prompt_2": negative_prompt_2,
                "original_size": original_size,
                "crops_coords_top_left": crops_coords_top_left,
                "target_size": target_size,
                "negative_original_size": negative_original_size,
                "negative_crops_coords_top_left": negative_crops_coords_top_left,
                "negative_target_size": negative_target_size,
            }
            options = {name: value for name, value in given.items() if value is not None}
            family.check_options(options)
            height, width, steps, guidance = family.request_defaults(
                height, width, num_inference_steps, guidance_scale
            )
            check_request(
                family,
                height,
                width,
                steps,
                num_images_per_prompt,
                output_type,
                guidance,
                max_sequence_length,
            )
            negatives = self._used_negatives(negatives, guidance)
            batch = len(prompts) * num_images_per_prompt
            generator, seeds = make_generators(generator, seed, batch)
            seed = seeds[0] if seeds else None
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
                **options,
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

            # 3. the loop (denoise.py): a linear scheduler as coefficient tables, the whole step graph-captured;
            #    any other takes its own step between graph-captured denoiser calls (schedule.py decides)
            plan = self.plan_schedule(height, width, steps)
            cond = family.denoiser_conditioning(text, height, width, batch, guidance, **options)
            rescale = float(options.get("guidance_rescale", 0.0))
            self._num_timesteps = plan.num_evaluations
            timesteps = plan.timesteps if isinstance(plan, Schedule) else plan.scheduler.timesteps
            self.backend.between_calls()
            with tqdm(
                total=plan.num_evaluations, desc="denoising", disable=not self.progress, leave=False
            ) as bar:
                on_step = self._on_step(bar.update, timesteps, callback_on_step_end)
                if isinstance(plan, Schedule):
                    latents = denoise_with_tables(
                        self.backend, family, plan, x0, cond, guidance, self.dtype, on_step, rescale
                    )
                else:
                    latents = denoise_with_scheduler(
                        self.backend,
                        family,
                        plan,
                        x0,
                        cond,
                        guidance,
                        self.dtype,
                        generator,
                        on_step,
                        rescale,
                    )
            self.backend.between_calls()
            clock = self._lap(timings, "denoise", clock)

            # 4. decode
            if output_type == "latent":
                images: Any = latents
                if caller is not None:  # it will be used, and freed, on the caller's stream
                    images.record_stream(caller)
            else:
                # the VAE's own dtype (SDXL: float32 under fp16, where it overflows) before unscaling
                vae_dtype = family.stage_dtype("vae_decoder", self.dtype)
                latent = family.decoder_input(latents.to(vae_dtype), height, width)
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
                "negative_prompt": negative_prompt if negatives is not None else None,
                "scheduler": type(self.scheduler).__name__,
            }
            return PipelineOutput(images=images, timings=timings, seed=seed, settings=settings, seeds=seeds)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps (model evaluations) of the current or last call, as diffusers names it."""
        return self._num_timesteps

    def warm_up(
        self,
        sizes: Sequence[tuple[int, int]] | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int = 1,
    ) -> dict[str, float]:
        """Serve one throw-away call per (width, height) so that the first request at each runs at full speed.

        It pays what a new size costs its first call and keeps for the process: compiled code for a new
        shape class, the step's CUDA graph (one per size serves 1-64 steps), cuDNN's plans (warming.py).
        cuDNN keeps its plans per thread: call this from the thread that will serve (the server's worker
        does). Default: the model's default size; each call runs the fewest steps that leave what a call at
        the default steps needs (2, where one graph serves both). A batch of `num_images_per_prompt` images
        is a shape of its own. Returns the seconds each size took, by "WxH"."""
        from .warming import warm_up

        return warm_up(self, sizes, num_inference_steps, num_images_per_prompt)

    def plan_schedule(self, height: int, width: int, steps: int) -> Schedule | SchedulerSteps:
        """One run of the pipeline's scheduler at this size (schedule.py): its tables, or its own steps."""
        return plan_schedule(
            self._scheduler,
            steps,
            device=self.device,
            begin_index=self.family.schedule_begin_index,
            **self.family.schedule_kwargs(height, width, steps),
        )

    # ---- helpers ----------------------------------------------------------------------------------------
    def _on_step(
        self, update: Callable[[], Any], timesteps: torch.Tensor, callback: Callable[..., Any] | None
    ) -> Callable[[], None]:
        """What runs after each step: the progress bar, then the caller's callback_on_step_end."""
        if callback is None:
            return update
        index = itertools.count()

        def on_step() -> None:
            update()
            i = next(index)
            callback(self, i, timesteps[i], {})  # the schedule's timesteps are on the host: no sync

        return on_step

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[torch.cuda.Stream | None]:
        """Inference mode, on the pipeline's own CUDA stream where there is one.

        Our stream first waits for the caller's current stream (whatever the caller enqueued before the
        call, e.g. weights it changed, is done before we read it), and the caller's stream waits for ours at
        the end (the tensors we return are safe to use on it). Yields the caller's stream (None on CPU)."""
        with torch.inference_mode():
            if self.stream is None:
                yield None
                return
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)
            try:
                with torch.cuda.stream(self.stream):
                    yield caller
            finally:
                caller.wait_stream(self.stream)

    def _run_stage(self, stage: str, inputs: Tensors) -> Tensors:
        spec = self.family.stages[stage]
        dtype = self.family.stage_dtype(stage, self.dtype)
        moved = {}
        for t in spec.inputs:
            if t.name in inputs:
                moved[t.name] = inputs[t.name].to(self.device, t.torch_dtype(dtype))
        return self.backend.engines[stage](**moved)

    def _lap(self, timings: dict[str, float], name: str, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        timings[name] = now - since
        return now

    def _used_negatives(self, negatives: list[str] | None, guidance: float) -> list[str] | None:
        """The negative prompts if this family and guidance scale use them; else None, said once."""
        if negatives is None or self.family.uses_negative_prompt(guidance):
            return negatives
        why = (
            f"{self.family.name} is guidance-distilled and has no negative prompt"
            if self.family.distilled_guidance
            else f"guidance_scale {guidance} does not run classifier-free guidance (it needs > 1)"
        )
        logger.warning("negative prompt ignored: %s", why)
        return None

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
