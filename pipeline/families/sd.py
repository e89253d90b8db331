"""Stable Diffusion 1.x / 2.x: CLIP text encoder, UNet2DConditionModel, 4-channel VAE.

The math follows diffusers' StableDiffusionPipeline: CLIP last hidden state as conditioning, classifier-free
guidance when guidance_scale > 1 (negative prompt or "" as the unconditional half, batched [uncond, cond]),
with `guidance_rescale` where given, epsilon or v-prediction as the scheduler config says, latents /
scaling_factor before the VAE decoder. Stable Diffusion XL (sdxl.py) builds on the stages defined here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from ..errors import InvalidInputError
from .base import (
    DimRange,
    Family,
    ShapeRange,
    StageSpec,
    Tensors,
    TensorSpec,
    classifier_free_guidance,
    vae_decoder_stage,
)
from .text import tokenize

logger = logging.getLogger(__name__)


def _clip(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    return {"last_hidden_state": module(x["input_ids"])[0]}


def _unet(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(
        x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"], return_dict=False
    )
    return {"noise_pred": out[0]}


class StableDiffusionFamily(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser = "unet"
    scheduler_class = "PNDMScheduler"
    call_options = frozenset({"guidance_rescale"})
    fp8_modules = ("*attentions.*",)  # the transformer blocks' projections and feed-forwards
    channels_last_on_cuda = True  # SD 1.5 512², H200: 0.52 s steady vs 0.61 s NCHW (torch_options.py)
    compile_resnets_on_cuda = "background"  # 0.45 s once they land, never in a request (torch_options.py)
    # 1x1 convolutions as GEMMs: fewer cuDNN plans to build at a new size (torch_options.py)
    inductor_options_on_cuda = MappingProxyType({"conv_1x1_as_mm": True})

    @property
    def granularity(self) -> int:
        return self.vae_scale_factor

    @property
    def default_size(self) -> int:
        return int(self.source.configs["unet"]["sample_size"]) * self.vae_scale_factor

    @property
    def default_steps(self) -> int:
        return 50

    @property
    def default_guidance(self) -> float:
        return 7.5

    def _build_stages(self) -> dict[str, StageSpec]:
        hidden = self.source.configs["text_encoder"]["hidden_size"]
        return {
            "text_encoder": self.text_encoder_stage(
                "text_encoder", (TensorSpec("last_hidden_state", ("batch", self.clip_length, hidden)),), _clip
            ),
            "unet": self.unet_stage(),
            "vae_decoder": vae_decoder_stage(self.source.configs["vae"]),
        }

    def text_encoder_stage(
        self,
        component: str,
        outputs: tuple[TensorSpec, ...],
        forward: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Tensors],
    ) -> StageSpec:
        """A CLIP text encoder stage: token ids of the encoder's full length in, `outputs` out."""
        length = int(self.source.configs[component]["max_position_embeddings"])
        return StageSpec(
            component, component, (TensorSpec("input_ids", ("batch", length), "int64"),), outputs, forward
        )

    def unet_stage(
        self,
        extra_inputs: tuple[TensorSpec, ...] = (),
        forward: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Tensors] = _unet,
    ) -> StageSpec:
        """The UNet stage: noisy latents, timestep and text in (plus `extra_inputs`), noise_pred out; the
        classifier-free guidance halves ride in `unet_batch`."""
        unet = self.source.configs["unet"]
        return StageSpec(
            "unet",
            "unet",
            (
                TensorSpec("sample", ("unet_batch", unet["in_channels"], "latent_height", "latent_width")),
                TensorSpec("timestep", ("unet_batch",), "float32"),
                TensorSpec(
                    "encoder_hidden_states", ("unet_batch", self.clip_length, unet["cross_attention_dim"])
                ),
                *extra_inputs,
            ),
            (
                TensorSpec(
                    "noise_pred", ("unet_batch", unet["out_channels"], "latent_height", "latent_width")
                ),
            ),
            forward,
        )

    # ---- shapes -----------------------------------------------------------------------------------------
    def dims(self, height: int, width: int, batch: int, cfg: bool = True) -> dict[str, int]:
        f = self.vae_scale_factor
        return {
            "batch": batch,
            "unet_batch": 2 * batch if cfg else batch,
            "latent_height": height // f,
            "latent_width": width // f,
            "image_height": height,
            "image_width": width,
        }

    def dim_ranges(self, shape_range: ShapeRange) -> dict[str, DimRange]:
        lo, opt, hi = (
            self.dims(*s, 1) for s in (shape_range.min_size, shape_range.opt_size, shape_range.max_size)
        )
        ranges = {k: DimRange(lo[k], opt[k], hi[k]) for k in lo}
        ranges["batch"] = DimRange(shape_range.min_batch, shape_range.opt_batch, shape_range.max_batch)
        # without guidance the UNet sees the batch once, with it twice
        ranges["unet_batch"] = DimRange(
            shape_range.min_batch, 2 * shape_range.opt_batch, 2 * shape_range.max_batch
        )
        return ranges

    # ---- pipeline math ----------------------------------------------------------------------------------
    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and self.source.configs["unet"].get("time_cond_proj_dim") is None

    def uses_negative_prompt(self, guidance_scale: float) -> bool:
        return self.uses_cfg(guidance_scale)

    def encode_prompt(
        self,
        run: Callable[[str, Tensors], Tensors],
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        **kwargs: Any,
    ) -> Tensors:
        tokenizer = self.source.tokenizer("tokenizer")
        length = tokenizer.model_max_length
        n = num_images_per_prompt
        embeds = run("text_encoder", {"input_ids": tokenize(tokenizer, prompts, length)})["last_hidden_state"]
        text = {"encoder_hidden_states": embeds.repeat_interleave(n, dim=0)}
        if self.uses_cfg(guidance_scale):
            negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
            if len(negatives) != len(prompts):
                raise InvalidInputError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt"
                )
            ids = tokenize(tokenizer, negatives, embeds.shape[1])
            uncond = run("text_encoder", {"input_ids": ids})["last_hidden_state"]
            text["negative_encoder_hidden_states"] = uncond.repeat_interleave(n, dim=0)
        return text

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (batch, self.source.configs["unet"]["in_channels"], height // f, width // f)

    def pack_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return noise

    def adopt_scheduler(self, scheduler: Any) -> Any:
        """StableDiffusionPipeline.__init__ rewrites an outdated scheduler config: steps_offset=1 and
        clip_sample=False (old checkpoints ship DDIM with steps_offset 0 and clip_sample true)."""
        fixes = {}
        if getattr(scheduler.config, "steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if getattr(scheduler.config, "clip_sample", False) is True:
            fixes["clip_sample"] = False
        if not fixes:
            return scheduler
        from diffusers.configuration_utils import FrozenDict

        logger.info("scheduler config outdated: %s, as StableDiffusionPipeline sets it", fixes)
        adopted = copy.deepcopy(scheduler)
        adopted._internal_dict = FrozenDict({**adopted.config, **fixes})
        return adopted

    def schedule_kwargs(self, height: int, width: int, num_inference_steps: int) -> dict[str, Any]:
        return {}

    def denoiser_conditioning(
        self, text: Tensors, height: int, width: int, batch: int, guidance_scale: float, **kwargs: Any
    ) -> Tensors:
        embeds = text["encoder_hidden_states"]
        if "negative_encoder_hidden_states" in text:
            embeds = torch.cat([text["negative_encoder_hidden_states"], embeds])
        return {"encoder_hidden_states": embeds}

    def denoiser_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Tensors) -> Tensors:
        embeds = cond["encoder_hidden_states"]
        if embeds.shape[0] != latents.shape[0]:  # classifier-free guidance: [uncond, cond]
            latents = torch.cat([latents, latents])
        return {
            "sample": latents,
            "timestep": timestep.expand(latents.shape[0]),
            "encoder_hidden_states": embeds,
        }

    def guide(
        self,
        output: torch.Tensor,
        guidance_scale: torch.Tensor,
        batch: int,
        guidance_rescale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output.shape[0] == batch:  # no classifier-free guidance (and so no rescale, as in diffusers)
            return output
        return classifier_free_guidance(output, guidance_scale, guidance_rescale)

    def timestep_values(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return timesteps.to(torch.float32)

    def decoder_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents / self.source.configs["vae"]["scaling_factor"]
