"""Random LoRA files for tests and benchmarks (what tiny.py is for models): no download, real file formats.

Two formats, as LoRAs are found in the wild:

- diffusers / PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, written by diffusers' own
  `save_lora_weights`, with the PEFT config (`r`, `lora_alpha`) in the safetensors metadata.
- kohya / A1111 (sd-scripts): `lora_unet_...` / `lora_te_...` (`lora_te1_` for FLUX's CLIP) names with
  `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`. Stable Diffusion modules are named by their
  diffusers path with `_` for `.`; FLUX modules by the original BFL layout (`double_blocks_0_img_attn_qkv`:
  one LoRA over the fused q/k/v projection, `single_blocks_0_linear2`...), the way sd-scripts names them.

The loader (pipeline/lora/) never reads these names itself: diffusers' converters do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn


class LoraFormat(StrEnum):
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


# What a LoRA trainer usually targets, per component (regular expressions over module names).
ATTENTION_MLP = {
    "transformer": (
        r".*attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)$",
        r".*ff(_context)?\.net\.(0\.proj|2)$",
        r".*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
    ),
    "unet": (
        r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
        r".*ff\.net\.(0\.proj|2)$",
        r".*(proj_in|proj_out)$",
    ),
    "text_encoder": (r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)$", r".*mlp\.fc[12]$"),
}


def target_modules(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the Linear / Conv2d modules of `module` that match one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear | nn.Conv2d) and any(p.fullmatch(name) for p in compiled)
    ]


def _pair(layer: nn.Module, rank: int, gen: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down / A, up / B) for one layer, shaped as PEFT and kohya store them."""
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * std
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * std
    else:
        down = torch.randn(rank, layer.in_features, generator=gen) * std
        up = torch.randn(layer.out_features, rank, generator=gen) * std
    return down, up


def random_lora(
    modules: Mapping[str, nn.Module],
    path: str | Path,
    *,
    targets: Mapping[str, Sequence[str]] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    lora_format: LoraFormat | str = LoraFormat.DIFFUSERS,
    pipeline_class: str = "FluxPipeline",
    seed: int = 0,
    std: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random LoRA for `modules` ({component: module}) to the .safetensors file `path`.

    targets: {component: module-name patterns}; default ATTENTION_MLP for the components given.
    alpha: the LoRA alpha (scaling alpha / rank); None means alpha = rank. The factors are drawn with
    standard deviation `std` so that the LoRA visibly changes a tiny model's image.
    """
    path = Path(path)
    lora_format = LoraFormat(lora_format)
    gen = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    layers: dict[str, dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {}
    for component, module in modules.items():
        patterns = (targets or ATTENTION_MLP)[component]
        names = target_modules(module, patterns)
        if not names:
            raise ValueError(f"no module of {component} matches {patterns}")
        layers[component] = {}
        for name in names:
            layer = module.get_submodule(name)
            down, up = _pair(layer, rank, gen, std)
            layers[component][name] = (layer, down.to(dtype), up.to(dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora_format is LoraFormat.DIFFUSERS:
        _save_diffusers(layers, path, rank, alpha, pipeline_class)
    else:
        _save_kohya(layers, path, alpha, flux=pipeline_class.startswith("Flux"))
    return path


def _save_diffusers(layers: dict, path: Path, rank: int, alpha: float, pipeline_class: str) -> None:
    import diffusers

    kwargs = {}
    for component, entries in layers.items():
        state = {}
        for name, (_, down, up) in entries.items():
            state[f"{name}.lora_A.weight"] = down
            state[f"{name}.lora_B.weight"] = up
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(entries),
        }
    getattr(diffusers, pipeline_class).save_lora_weights(path.parent, weight_name=path.name, **kwargs)


# sd-scripts' FLUX names (the original BFL layout) for the diffusers modules they cover: a LoRA on a fused
# BFL projection (qkv, linear1) covers several diffusers modules, concatenated along the output rows.
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}
# linear1 (q, k, v, proj_mlp) is left out: diffusers' converter splits it at FLUX.1's real widths only.
_FLUX_SINGLE = {"linear2": ("proj_out",)}


def _kohya_flux_names(entries: Mapping[str, tuple]) -> dict[str, list[str]]:
    """kohya name -> the diffusers modules it covers, for the transformer modules in `entries`."""
    out: dict[str, list[str]] = {}
    for name in entries:
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
        if m is None:
            continue
        kind, index, rest = m.groups()
        table = _FLUX_DOUBLE if kind == "transformer_blocks" else _FLUX_SINGLE
        prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        for bfl, parts in table.items():
            if rest in parts and all(f"{kind}.{index}.{p}" in entries for p in parts):
                out[f"lora_unet_{prefix}_{index}_{bfl}"] = [f"{kind}.{index}.{p}" for p in parts]
    return out


def _save_kohya(layers: dict, path: Path, alpha: float, flux: bool) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}

    def put(kohya: str, down: torch.Tensor, up: torch.Tensor) -> None:
        state[f"{kohya}.lora_down.weight"] = down.contiguous()
        state[f"{kohya}.lora_up.weight"] = up.contiguous()
        state[f"{kohya}.alpha"] = torch.tensor(alpha)

    for component, entries in layers.items():
        if component in ("transformer", "unet") and flux:
            for kohya, parts in _kohya_flux_names(entries).items():
                down = entries[parts[0]][1]  # one down projection, one up block per covered module
                up = torch.cat([entries[p][2] for p in parts])
                put(kohya, down, up)
        elif component == "unet":
            for name, (_, down, up) in entries.items():
                put("lora_unet_" + name.replace(".", "_"), down, up)
        else:  # CLIP, named as transformers names it (with its text_model. root)
            prefix = "lora_te1_" if flux else "lora_te_"
            for name, (_, down, up) in entries.items():
                full = name if name.startswith("text_model.") else f"text_model.{name}"
                put(prefix + full.replace(".", "_"), down, up)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
