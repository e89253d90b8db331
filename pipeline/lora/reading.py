"""A LoRA file -> the factors of the layers it changes, through diffusers' own readers and converters."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraError
from .files import LoraFile, resolve_lora
from .weights import Factor, InPlaceWeights, WeightStore

if TYPE_CHECKING:
    from ..loading import ModelSource

# The text-encoder layers whose ranks diffusers reads to build the LoraConfig (_load_lora_into_text_encoder).
_TEXT_RANK_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def skeleton(source: ModelSource, component: str) -> nn.Module:
    """A component's module on the meta device: its layers and shapes, no weights."""
    import diffusers
    import transformers

    library, cls = source.component_class(component)
    folder = source.path / component
    with torch.device("meta"):
        if library == "transformers":
            return getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(folder))
        module_cls = getattr(diffusers, cls)
        return module_cls.from_config(module_cls.load_config(folder))


def loader_class(source: ModelSource) -> Any:
    """The diffusers pipeline class whose LoRA reader (`lora_state_dict`) serves this model."""
    import diffusers

    cls = getattr(diffusers, source.pipeline_class, None)
    if cls is None or not hasattr(cls, "lora_state_dict"):
        raise LoraError(f"{source.model_id} ({source.pipeline_class}) has no LoRA loader in diffusers")
    return cls


def lora_components(source: ModelSource) -> list[str]:
    """The components a LoRA may change (diffusers' `_lora_loadable_modules` this model has)."""
    present = {c for c, v in source.model_index.items() if isinstance(v, list) and v[0] is not None}
    return [c for c in loader_class(source)._lora_loadable_modules if c in present]


def _read_state_dict(loader: Any, file: LoraFile) -> tuple[dict, dict | None, dict | None]:
    kwargs: dict[str, Any] = {"weight_name": file.name, "return_lora_metadata": True}
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        kwargs["return_alphas"] = True  # FLUX's reader returns alphas only when asked
    from safetensors import SafetensorError

    try:
        return loader.lora_state_dict(str(file.path.parent), **kwargs)
    except (ValueError, KeyError, IndexError, AssertionError, OSError, SafetensorError) as e:
        raise LoraError(f"{file.name} is not a LoRA diffusers can read for {loader.__name__}: {e}") from e


def _config(sd: dict, alphas: dict | None, metadata: dict | None, text_encoder: bool) -> Any:
    """The LoraConfig diffusers builds for this state dict (loaders/peft.py, _load_lora_into_text_encoder)."""
    from diffusers.utils.peft_utils import _create_lora_config

    if text_encoder:
        rank = {
            k: v.shape[1]
            for k, v in sd.items()
            if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")].endswith(_TEXT_RANK_LAYERS)
        }
    else:
        rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    try:
        return _create_lora_config(sd, alphas, metadata, rank, is_unet=not text_encoder)
    except (ValueError, TypeError, IndexError) as e:
        raise LoraError(f"the LoRA's configuration cannot be read: {e}") from e


def _component_state(
    component: str,
    state: dict,
    alphas: dict | None,
    metadata: dict | None,
    text_encoder: bool,
    store: WeightStore,
) -> tuple[dict, dict | None, dict | None]:
    """One component's part of the file in PEFT names, as diffusers hands it to peft."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    prefix = f"{component}."
    sd = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    meta = (
        None
        if metadata is None
        else {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    )
    alpha = (
        None
        if alphas is None
        else {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    )
    if text_encoder:
        sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        if not store.has_module(component, "text_model"):  # CLIP without its text_model root (transformers 5)
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    elif "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    return sd, alpha, meta


def read_factors(file: LoraFile, source: ModelSource, store: WeightStore) -> list[Factor]:
    """Every layer `file` changes, resolved to `store`'s weights and checked against their shapes."""
    from peft.utils.other import get_pattern_key  # how peft finds a layer's rank and alpha in its config

    loader = loader_class(source)
    state, alphas, metadata = _read_state_dict(loader, file)
    components = lora_components(source)
    foreign = sorted({k.split(".")[0] for k in state} - set(components))
    if foreign:
        raise LoraError(
            f"{file.name} changes {', '.join(foreign)}, which {source.model_id} ({source.pipeline_class}) does "
            "not have: it is a LoRA for another architecture"
        )
    factors = []
    for component in components:
        text_encoder = source.component_class(component)[0] == "transformers"
        if not any(k.startswith(f"{component}.") for k in state):
            continue
        sd, alpha, meta = _component_state(component, state, alphas, metadata, text_encoder, store)
        config = _config(sd, alpha, meta, text_encoder)
        if config.use_dora or config.lora_bias:
            raise LoraError(f"{file.name}: DoRA and LoRA biases are not supported; use a plain LoRA")
        for layer in sorted({k.split(".lora_")[0] for k in sd}):
            down, up = sd.pop(f"{layer}.lora_A.weight", None), sd.pop(f"{layer}.lora_B.weight", None)
            if down is None or up is None:
                raise LoraError(f"{file.name}: {component}.{layer} lacks its lora_A or lora_B weight")
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), layer), config.r)
            a = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha
            )
            if down.shape[0] != r:
                raise LoraError(
                    f"{file.name}: {component}.{layer} has rank {down.shape[0]}, its config says {r}"
                )
            site = store.locate(component, layer)
            shape = (up.shape[0], *down.shape[1:])
            if site is None or shape != site.shape or up.shape[2:] not in ((), (1, 1)):
                what = "has no such layer" if site is None else f"has it {tuple(site.shape)}"
                raise LoraError(
                    f"{file.name} does not fit {source.model_id}: it changes {component}.{layer} "
                    f"{tuple(shape)}, the model {what}; it is a LoRA for another architecture"
                )
            scaling = a / math.sqrt(r) if config.use_rslora else a / r
            place = {"device": site.device, "dtype": site.dtype}
            factors.append(Factor(site, down.to(**place), up.to(**place), scaling))
        if sd:
            raise LoraError(
                f"{file.name} holds tensors this loader does not use: {', '.join(sorted(sd)[:4])}"
            )
    if not factors:
        raise LoraError(f"{file.name} changes no layer of {source.model_id}")
    return factors


def check_lora(path_or_id: str | Path, source: ModelSource, weight_name: str | None = None) -> LoraFile:
    """Find a LoRA and check it fits `source`'s architecture, on meta-device modules (no weights loaded)."""
    file = resolve_lora(path_or_id, weight_name)
    skeletons = {c: skeleton(source, c) for c in lora_components(source)}
    read_factors(file, source, InPlaceWeights(skeletons))
    return file
