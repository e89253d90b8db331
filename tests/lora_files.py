"""Random LoRA files for the tiny models, in diffusers/PEFT and kohya/A1111 format (for the LoRA tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline

from pipeline.loading import read_model
from pipeline.random_lora import ATTENTION_MLP, LoraFormat, random_lora

FAMILIES = {
    "flux": ("tiny_flux", FluxPipeline, "transformer", {"max_sequence_length": 32}),
    "sd": ("tiny_sd", StableDiffusionPipeline, "unet", {}),
}
# the kohya SD LoRA also covers 3x3 convolutions (resnets' conv1), as kohya's LoCon-style files do
SD_KOHYA = {
    "unet": (*ATTENTION_MLP["unet"], r".*resnets\.\d+\.conv1$"),
    "text_encoder": ATTENTION_MLP["text_encoder"],
}


def make_loras(folder: Path, out: Path, family: str) -> dict[str, Path]:
    """Two random LoRAs for a tiny model: diffusers format (alpha != rank, text encoder included) and kohya."""
    source = read_model(folder)
    cls, denoiser = FAMILIES[family][1], FAMILIES[family][2]
    modules = {c: source.load_component(c, torch.float32) for c in (denoiser, "text_encoder")}
    common = {"pipeline_class": cls.__name__}
    return {
        "peft": random_lora(modules, out / f"{family}-peft.safetensors", rank=4, alpha=8, seed=1, **common),
        "kohya": random_lora(
            modules,
            out / f"{family}-kohya.safetensors",
            rank=3,
            alpha=1.5,
            lora_format=LoraFormat.KOHYA,
            targets=SD_KOHYA if family == "sd" else None,
            seed=2,
            **common,
        ),
    }
