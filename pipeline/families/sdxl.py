"""Stable Diffusion XL (base): CLIP-L + OpenCLIP-G text encoders, UNet with added conditioning, 4-channel VAE.

The math follows diffusers' StableDiffusionXLPipeline:
- text: the penultimate hidden state of both encoders (`hidden_states[-2]`), concatenated on the feature
  axis; the pooled projection of the second (`text_embeds`). `prompt_2` / `negative_prompt_2` go to the
  second encoder (default: `prompt` / `negative_prompt`).
- unconditional half: zeros when no negative prompt is given and the model says
  `force_zeros_for_empty_prompt` (SDXL base does), else the encoded negative prompts ("" by default).
- micro-conditioning: `time_ids` = original_size + crops_coords_top_left + target_size per image, and the
  `negative_*` ones for the unconditional half when both negative sizes are given.
- guidance with `guidance_rescale`, as for Stable Diffusion; the scheduler starts at index 0.
- decode: latents * latents_std / scaling_factor + latents_mean where the VAE config has them, else
  latents / scaling_factor; the VAE in float32 when the pipeline runs in float16 and the VAE config says
  `force_upcast` (SDXL's VAE overflows in float16 and decodes NaNs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from ..errors import InvalidInputError, UnsupportedModelError
from .base import StageSpec, Tensors, TensorSpec, vae_decoder_stage
from .sd import StableDiffusionFamily
from .text import tokenize

logger = logging.getLogger(__name__)

# original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)
TIME_IDS = 6
SIZE_OPTIONS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def _clip_penultimate(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(x["input_ids"], output_hidden_states=True)
    return {"penultimate_hidden_state": out.hidden_states[-2]}


def _clip_penultimate_and_pooled(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(x["input_ids"], output_hidden_states=True)
    return {"penultimate_hidden_state": out.hidden_states[-2], "text_embeds": out.text_embeds}


def _unet(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    out = module(
        x["sample"],
        x["timestep"],
        encoder_hidden_states=x["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
        return_dict=False,
    )
    return {"noise_pred": out[0]}


def _per_prompt(value: str | list[str] | None, count: int, name: str) -> list[str] | None:
    """A second prompt (or negative) per prompt; None where diffusers falls back to the first ("" too)."""
    if not value:
        return None
    values = [value] * count if isinstance(value, str) else list(value)
    if len(values) != count or not all(isinstance(v, str) for v in values):
        raise InvalidInputError(f"{name} must be a string or a list of {count} strings (one per prompt)")
    return values


def _size(value: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise InvalidInputError(f"{name} must be two non-negative integers (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser = "unet"
    call_options = frozenset({"guidance_rescale", "prompt_2", "negative_prompt_2", *SIZE_OPTIONS})
    schedule_begin_index = True
    channels_last_on_cuda = False  # SDXL 1024², H200: NCHW 1.32 s steady, channels-last 1.36 s
    compile_resnets_on_cuda = "off"
    inductor_options_on_cuda = MappingProxyType({})  # SD's conv_1x1_as_mm lost here (torch_options.py)

    @property
    def default_guidance(self) -> float:
        return 5.0  # diffusers' StableDiffusionXLPipeline default

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.source.model_index.get("force_zeros_for_empty_prompt", True))

    def component_dtype(self, component: str, dtype: torch.dtype) -> torch.dtype:
        vae = self.source.configs["vae"]
        if component == "vae" and dtype == torch.float16 and vae.get("force_upcast", False):
            return torch.float32
        return dtype

    def _build_stages(self) -> dict[str, StageSpec]:
        cfg = self.source.configs
        unet = cfg["unet"]
        first, second = cfg["text_encoder"], cfg["text_encoder_2"]
        pooled = int(second["projection_dim"])
        expected = unet.get("projection_class_embeddings_input_dim")
        passed = unet.get("addition_time_embed_dim", 0) * TIME_IDS + pooled
        if unet.get("addition_embed_type") != "text_time" or expected != passed:
            raise UnsupportedModelError(
                f"{self.source.model_id}: the UNet takes added conditioning of {expected} values, but "
                f"{TIME_IDS} time ids and text_encoder_2's {pooled}-wide projection make {passed} "
                "(addition_embed_type must be 'text_time')"
            )
        lengths = {int(first["max_position_embeddings"]), int(second["max_position_embeddings"])}
        if len(lengths) != 1:
            raise UnsupportedModelError(
                f"{self.source.model_id}: the text encoders take {sorted(lengths)} tokens; "
                "SDXL concatenates their hidden states, which needs one length"
            )

        def hidden(config: Mapping[str, Any]) -> TensorSpec:
            return TensorSpec("penultimate_hidden_state", ("batch", self.clip_length, config["hidden_size"]))

        return {
            "text_encoder": self.text_encoder_stage("text_encoder", (hidden(first),), _clip_penultimate),
            "text_encoder_2": self.text_encoder_stage(
                "text_encoder_2",
                (hidden(second), TensorSpec("text_embeds", ("batch", pooled))),
                _clip_penultimate_and_pooled,
            ),
            "unet": self.unet_stage(
                (
                    TensorSpec("text_embeds", ("unet_batch", pooled)),
                    TensorSpec("time_ids", ("unet_batch", TIME_IDS), "float32"),
                ),
                _unet,
            ),
            "vae_decoder": vae_decoder_stage(cfg["vae"]),
        }

    # ---- pipeline math ----------------------------------------------------------------------------------
    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        for name in SIZE_OPTIONS:
            _size(options.get(name), name)

    def _encode(
        self, run: Callable[[str, Tensors], Tensors], prompts: list[str], prompts_2: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders: (penultimate hidden states concatenated, pooled projection of the second)."""
        outs = []
        for stage, tokenizer_name, texts in (
            ("text_encoder", "tokenizer", prompts),
            ("text_encoder_2", "tokenizer_2", prompts_2),
        ):
            tokenizer = self.source.tokenizer(tokenizer_name)
            outs.append(run(stage, {"input_ids": tokenize(tokenizer, texts, tokenizer.model_max_length)}))
        embeds = torch.cat([o["penultimate_hidden_state"] for o in outs], dim=-1)
        return embeds, outs[1]["text_embeds"]

    def encode_prompt(
        self,
        run: Callable[[str, Tensors], Tensors],
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        **kwargs: Any,
    ) -> Tensors:
        count, n = len(prompts), num_images_per_prompt
        prompts_2 = _per_prompt(prompt_2, count, "prompt_2") or prompts
        negatives_2 = _per_prompt(negative_prompt_2, count, "negative_prompt_2")
        embeds, pooled = self._encode(run, prompts, prompts_2)
        text = {
            "encoder_hidden_states": embeds.repeat_interleave(n, dim=0),
            "text_embeds": pooled.repeat_interleave(n, dim=0),
        }
        if not self.uses_cfg(guidance_scale):
            return text
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            if negatives_2 is not None:
                logger.warning(
                    "negative_prompt_2 is ignored without negative_prompt: this model zeroes the "
                    "unconditional half (force_zeros_for_empty_prompt), as diffusers does"
                )
            neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negatives = negative_prompts if negative_prompts is not None else [""] * count
            neg, neg_pooled = self._encode(run, negatives, negatives_2 or negatives)
        text["negative_encoder_hidden_states"] = neg.repeat_interleave(n, dim=0)
        text["negative_text_embeds"] = neg_pooled.repeat_interleave(n, dim=0)
        return text

    def denoiser_conditioning(
        self,
        text: Tensors,
        height: int,
        width: int,
        batch: int,
        guidance_scale: float,
        original_size: Sequence[int] | None = None,
        crops_coords_top_left: Sequence[int] | None = None,
        target_size: Sequence[int] | None = None,
        negative_original_size: Sequence[int] | None = None,
        negative_crops_coords_top_left: Sequence[int] | None = None,
        negative_target_size: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Tensors:
        device = text["encoder_hidden_states"].device

        def time_ids(
            original: Sequence[int], crops: Sequence[int] | None, target: Sequence[int]
        ) -> torch.Tensor:
            values = [*original, *(crops or (0, 0)), *target]
            return torch.tensor([values], dtype=torch.float32, device=device).repeat(batch, 1)

        ids = time_ids(
            original_size or (height, width), crops_coords_top_left, target_size or (height, width)
        )
        cond = {
            "encoder_hidden_states": text["encoder_hidden_states"],
            "text_embeds": text["text_embeds"],
            "time_ids": ids,
        }
        if "negative_encoder_hidden_states" not in text:
            return cond
        # diffusers uses the negative sizes only when both are given (and the positive ones otherwise); it
        # repeats [negative, positive] rows per image, which pairs them with the right halves at batch 1
        # only: here each half gets its own rows at every batch size.
        neg_ids = ids
        if negative_original_size is not None and negative_target_size is not None:
            neg_ids = time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size)
        return {
            "encoder_hidden_states": torch.cat(
                [text["negative_encoder_hidden_states"], cond["encoder_hidden_states"]]
            ),
            "text_embeds": torch.cat([text["negative_text_embeds"], cond["text_embeds"]]),
            "time_ids": torch.cat([neg_ids, ids]),
        }

    def denoiser_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Tensors) -> Tensors:
        inputs = super().denoiser_inputs(latents, timestep, cond)
        return dict(inputs, text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])

    def decoder_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.source.configs["vae"]
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        if mean is None or std is None:
            return latents / vae["scaling_factor"]

        def channels(values: list[float]) -> torch.Tensor:
            return torch.tensor(values).view(1, -1, 1, 1).to(latents.device, latents.dtype)

        return latents * channels(std) / vae["scaling_factor"] + channels(mean)
