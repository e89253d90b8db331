"""Real-size architectures with random weights, for benchmarks and exports with no download.

`make_architecture("flux-dev", folder)` writes a diffusers-format folder holding the real configs (FLUX.1-dev,
FLUX.1-schnell, SD 1.5, SD 2.1, SDXL base 1.0), local tokenizers and the model's scheduler, but no weights: it carries a
`RANDOM_WEIGHTS` marker, and `ModelSource.load_component` builds each module from its config directly on
the target device with a small random init (std 0.02) so activations stay finite in bf16/fp16.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .tiny import SDXL_SCHEDULER, _write_clip_tokenizer, _write_t5_tokenizer, write_folder_atomically

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"

_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_OPENCLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
# SDXL's second text encoder, OpenCLIP ViT-bigG/14's text tower (text_encoder_2/config.json of
# stabilityai/stable-diffusion-xl-base-1.0, written from memory: 694.7M parameters with these values)
_OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
_SD_SCHED = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _flux(guidance: bool) -> dict[str, Any]:
    return {
        "_class_name": "FluxPipeline",
        "transformer": (
            "FluxTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 19,
                "num_single_layers": 38,
                "attention_head_dim": 128,
                "num_attention_heads": 24,
                "joint_attention_dim": 4096,
                "pooled_projection_dim": 768,
                "guidance_embeds": guidance,
                "axes_dims_rope": [16, 56, 56],
            },
        ),
        "vae": (
            "AutoencoderKL",
            dict(
                _VAE,
                latent_channels=16,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("T5EncoderModel", _T5_XXL),
        "scheduler": (
            "FlowMatchEulerDiscreteScheduler",
            {
                "shift": 3.0 if guidance else 1.0,
                "use_dynamic_shifting": guidance,
                "base_shift": 0.5,
                "max_shift": 1.15,
                "base_image_seq_len": 256,
                "max_image_seq_len": 4096,
            },
        ),
    }


def _sd(version: int) -> dict[str, Any]:
    v2 = version == 2
    unet = {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}
    if v2:
        unet = {
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "sample_size": 96,
        }
    return {
        "_class_name": "StableDiffusionPipeline",
        "unet": ("UNet2DConditionModel", unet),
        "vae": (
            "AutoencoderKL",
            dict(_VAE, latent_channels=4, sample_size=768 if v2 else 512, scaling_factor=0.18215),
        ),
        "text_encoder": ("CLIPTextModel", _OPENCLIP_H if v2 else _CLIP_L),
        "scheduler": (
            ("DDIMScheduler", dict(_SD_SCHED, prediction_type="v_prediction", clip_sample=False))
            if v2
            else ("PNDMScheduler", dict(_SD_SCHED, skip_prk_steps=True))
        ),
    }


def _sdxl() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 (configs written from memory, checked against diffusers'
    conventions: the UNet's added-conditioning width 2816 = 6 time ids x 256 + the 1280-wide pooled projection,
    cross-attention 2048 = CLIP-L 768 + bigG 1280; 2.567B UNet parameters with these values)."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_index": {"force_zeros_for_empty_prompt": True},
        "unet": (
            "UNet2DConditionModel",
            {
                "sample_size": 128,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280],
                "layers_per_block": 2,
                "transformer_layers_per_block": [1, 2, 10],
                "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "norm_num_groups": 32,
            },
        ),
        "vae": (
            "AutoencoderKL",
            dict(_VAE, latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        ),
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", _OPENCLIP_BIGG),
        "scheduler": ("EulerDiscreteScheduler", SDXL_SCHEDULER),
    }


ARCHITECTURES = {
    "flux-dev": lambda: _flux(guidance=True),
    "flux-schnell": lambda: _flux(guidance=False),
    "sd15": lambda: _sd(1),
    "sd21": lambda: _sd(2),
    "sdxl": _sdxl,
}

_CLIP = ("CLIPTextModel", "CLIPTextModelWithProjection")
_LIBRARY = {**dict.fromkeys(_CLIP, "transformers"), "T5EncoderModel": "transformers"}


def make_architecture(name: str, folder: str | Path) -> Path:
    """Write the config-only folder of a named real-size architecture (atomically)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]()

    def fill(tmp: Path) -> None:
        index: dict[str, Any] = {"_class_name": spec.pop("_class_name"), **spec.pop("_index", {})}
        clip_vocab = _write_clip_tokenizer(tmp / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        if "text_encoder_2" in spec and spec["text_encoder_2"][0] in _CLIP:  # SDXL: pads with "!"
            _write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
            index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        elif "text_encoder_2" in spec:
            _write_t5_tokenizer(tmp / "tokenizer_2", max_length=512)
            index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
        for component, (cls, config) in spec.items():
            library = _LIBRARY.get(cls, "diffusers")
            index[component] = [library, cls]
            config = dict(config)
            if cls in _CLIP:  # our tokenizer's special ids; real vocab size
                config.update(
                    vocab_size=49408,
                    bos_token_id=clip_vocab - 2,
                    eos_token_id=clip_vocab - 1,
                    pad_token_id=clip_vocab - 1,
                )
            _write_config(tmp / component, library, cls, config)
        if spec.get("unet") and index["_class_name"] == "StableDiffusionPipeline":
            index.update(
                requires_safety_checker=False, safety_checker=[None, None], feature_extractor=[None, None]
            )
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / RANDOM_WEIGHTS_MARKER).write_text(f"{name}: configs only, random weights made at load time\n")

    return write_folder_atomically(folder, fill)


def _write_config(folder: Path, library: str, cls: str, config: dict[str, Any]) -> None:
    import diffusers
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if library == "transformers":
        config_cls = transformers.CLIPTextConfig if cls in _CLIP else transformers.T5Config
        config_cls(**config).save_pretrained(folder)
    elif cls.endswith("Scheduler"):
        getattr(diffusers, cls)(**config).save_config(folder)
    else:
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**config)
        model.save_config(folder)


def build_random(
    library: str,
    cls: str,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    per_part: Callable[[torch.nn.Module], object] | None = None,
) -> torch.nn.Module:
    """Build a module from its config on `device` in `dtype`, weights drawn from N(0, 0.02), norms at 1.

    With `per_part`, the module is built on the meta device and allocated part by part, `per_part(module)`
    after each (loading.place_in_parts); the weights are the same as without it."""
    import diffusers
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(
        dtype
    )  # build in the target dtype: FLUX in fp32 would not fit next to its bf16 copy
    try:
        with torch.device("meta" if per_part is not None else device):
            if library == "transformers":
                module = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(folder))
            else:
                module_cls = getattr(diffusers, cls)
                module = module_cls.from_config(module_cls.load_config(folder))
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)

    def init(part: torch.nn.Module, recurse: bool = True) -> None:
        with torch.no_grad():
            for name, p in part.named_parameters(recurse=recurse):
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=gen)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    module.eval().requires_grad_(False)
    if per_part is None:
        init(module)
        return module
    from .loading import place_in_parts

    # tied parameters (one tensor under two names) would be drawn twice part by part
    shared = sum(1 for _ in module.named_parameters(remove_duplicate=False)) != sum(
        1 for _ in module.parameters()
    )
    if shared or any(True for _ in module.buffers()):  # buffers would need their own init: build it whole
        module = build_random(library, cls, folder, dtype, device, seed)
        per_part(module)
        return module
    return place_in_parts(module, torch.device(device), per_part, init=init)
