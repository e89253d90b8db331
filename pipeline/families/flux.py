"""FLUX.1 (dev and schnell): CLIP + T5 text encoders, FluxTransformer2DModel, 16-channel VAE, flow matching.

The math follows diffusers' FluxPipeline: pooled CLIP embedding + T5 sequence, 2x2-packed latents as image
tokens, dynamic shifting of the flow-matching sigmas with the image token count, guidance embedding when
the transformer has one, unpack + (latents / scaling) + shift before the VAE decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .base import DimRange, Family, ShapeRange, StageSpec, Tensors, TensorSpec, vae_decoder_stage
from .text import tokenize


def _clip_pooled(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(x["input_ids"], output_hidden_states=False)
    return {"pooler_output": out.pooler_output}


def _t5(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    return {"last_hidden_state": module(x["input_ids"], output_hidden_states=False)[0]}


def _transformer(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(
        hidden_states=x["hidden_states"],
        encoder_hidden_states=x["encoder_hidden_states"],
        pooled_projections=x["pooled_projections"],
        timestep=x["timestep"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x.get("guidance"),
        return_dict=False,
    )[0]
    return {"noise_pred": out}


class FluxFamily(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser = "transformer"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    default_cuda_dtype = torch.bfloat16
    schedule_begin_index = True
    distilled_guidance = True
    max_text_tokens = 512  # T5's length in diffusers' FluxPipeline
    fp8_modules = ("transformer_blocks.*", "single_transformer_blocks.*")
    fp8_while_loading = True
    fp8_attention = True

    @property
    def granularity(self) -> int:
        return self.vae_scale_factor * 2  # VAE downsampling, then 2x2 packing

    @property
    def has_guidance(self) -> bool:
        return bool(self.source.configs["transformer"].get("guidance_embeds", False))

    @property
    def default_steps(self) -> int:
        return 28 if self.has_guidance else 4  # dev / schnell, as their model cards say

    @property
    def default_guidance(self) -> float:
        return 3.5 if self.has_guidance else 0.0

    def _build_stages(self) -> dict[str, StageSpec]:
        cfg = self.source.configs
        tcfg = cfg["transformer"]
        vae = cfg["vae"]
        in_ch = tcfg["in_channels"]
        out_ch = tcfg.get("out_channels") or in_ch
        transformer_inputs = [
            TensorSpec("hidden_states", ("batch", "image_tokens", in_ch)),
            TensorSpec("encoder_hidden_states", ("batch", "text_tokens", tcfg["joint_attention_dim"])),
            TensorSpec("pooled_projections", ("batch", tcfg["pooled_projection_dim"])),
            TensorSpec("timestep", ("batch",)),
            TensorSpec("img_ids", ("image_tokens", 3)),
            TensorSpec("txt_ids", ("text_tokens", 3)),
        ]
        if self.has_guidance:
            transformer_inputs.append(TensorSpec("guidance", ("batch",), "float32"))
        return {
            "text_encoder": StageSpec(
                "text_encoder",
                "text_encoder",
                (TensorSpec("input_ids", ("batch", self.clip_length), "int64"),),
                (TensorSpec("pooler_output", ("batch", cfg["text_encoder"]["hidden_size"])),),
                _clip_pooled,
            ),
            "text_encoder_2": StageSpec(
                "text_encoder_2",
                "text_encoder_2",
                (TensorSpec("input_ids", ("batch", "text_tokens"), "int64"),),
                (
                    TensorSpec(
                        "last_hidden_state", ("batch", "text_tokens", cfg["text_encoder_2"]["d_model"])
                    ),
                ),
                _t5,
            ),
            "transformer": StageSpec(
                "transformer",
                "transformer",
                tuple(transformer_inputs),
                (TensorSpec("noise_pred", ("batch", "image_tokens", out_ch)),),
                _transformer,
            ),
            "vae_decoder": vae_decoder_stage(vae),
        }

    # ---- shapes -----------------------------------------------------------------------------------------
    def dims(self, height: int, width: int, batch: int, text_tokens: int = 512) -> dict[str, int]:
        f = self.vae_scale_factor
        return {
            "batch": batch,
            "image_tokens": (height // (2 * f)) * (width // (2 * f)),
            "text_tokens": text_tokens,
            "latent_height": height // f,
            "latent_width": width // f,
            "image_height": height,
            "image_width": width,
        }

    def dim_ranges(
        self, shape_range: ShapeRange, text_tokens: tuple[int, int, int] = (256, 512, 512)
    ) -> dict[str, DimRange]:
        lo, opt, hi = (
            self.dims(*s, 1) for s in (shape_range.min_size, shape_range.opt_size, shape_range.max_size)
        )
        ranges = {k: DimRange(lo[k], opt[k], hi[k]) for k in lo}
        ranges["batch"] = DimRange(shape_range.min_batch, shape_range.opt_batch, shape_range.max_batch)
        ranges["text_tokens"] = DimRange(*text_tokens)
        return ranges

    # ---- pipeline math ----------------------------------------------------------------------------------
    def encode_prompt(
        self,
        run: Callable[[str, Tensors], Tensors],
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> Tensors:
        # CLIP gives only the pooled summary; T5 reads the text, and says when it had to drop some
        clip_ids = tokenize(self.source.tokenizer("tokenizer"), prompts, self.clip_length, warn=False)
        t5_ids = tokenize(self.source.tokenizer("tokenizer_2"), prompts, max_sequence_length)
        pooled = run("text_encoder", {"input_ids": clip_ids})["pooler_output"]
        embeds = run("text_encoder_2", {"input_ids": t5_ids})["last_hidden_state"]
        n = num_images_per_prompt
        cond = {
            "pooled_projections": pooled.repeat_interleave(n, dim=0),
            "encoder_hidden_states": embeds.repeat_interleave(n, dim=0),
        }
        cond["txt_ids"] = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        return cond

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        channels = self.source.configs["transformer"]["in_channels"] // 4
        return (batch, channels, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def pack_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, c, h, w = noise.shape
        x = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def image_ids(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        f = self.vae_scale_factor
        h, w = height // (2 * f), width // (2 * f)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device=device, dtype=dtype)

    def schedule_kwargs(self, height: int, width: int, num_inference_steps: int) -> dict[str, Any]:
        sched = self.source.configs["scheduler"]
        seq_len = self.dims(height, width, 1)["image_tokens"]
        base_len = sched.get("base_image_seq_len", 256)
        max_len = sched.get("max_image_seq_len", 4096)
        base_shift = sched.get("base_shift", 0.5)
        max_shift = sched.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = seq_len * m + (base_shift - m * base_len)
        if sched.get("use_flow_sigmas", False):
            return {"mu": mu}
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return {"sigmas": sigmas, "mu": mu}

    def denoiser_conditioning(
        self, text: Tensors, height: int, width: int, batch: int, guidance_scale: float, **kwargs: Any
    ) -> Tensors:
        embeds = text["encoder_hidden_states"]
        cond = dict(text, img_ids=self.image_ids(height, width, embeds.device, embeds.dtype))
        if self.has_guidance:
            cond["guidance"] = torch.full((batch,), guidance_scale, device=embeds.device, dtype=torch.float32)
        return cond

    def denoiser_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Tensors) -> Tensors:
        return dict(cond, hidden_states=latents, timestep=timestep.expand(latents.shape[0]))

    def guide(
        self,
        output: torch.Tensor,
        guidance_scale: torch.Tensor,
        batch: int,
        guidance_rescale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return output  # guidance-distilled: the guidance scale is a transformer input

    def timestep_values(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # diffusers: t.expand(batch).to(latents.dtype) / 1000
        return timesteps.to(torch.float32).to(dtype) / 1000

    def decoder_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor
        b, _, c = latents.shape
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h, w)
        vae = self.source.configs["vae"]
        return x / vae["scaling_factor"] + vae.get("shift_factor", 0.0)
