"""Fused Q/K/V projections without the weights they replace.

diffusers' `fuse_qkv_projections` concatenates each attention's Q, K and V Linear layers into one (`to_qkv`,
`to_kv` for cross-attention, `to_added_qkv` for FLUX's text stream) and keeps the separate layers so that
`unfuse_qkv_projections` can go back. Nothing here ever unfuses, and those kept layers are 2.15 B of
FLUX.1-dev's 11.9 B parameters (4.3 GB in bf16) that no call reads: `fuse_projections` drops them.
LoRA finds a dropped layer's rows inside the fused one (lora/weights.py), so LoRA files keep their names.
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn

logger = logging.getLogger(__name__)

# a fused layer -> the layers it concatenates along its output rows, in order (diffusers' fuse_projections)
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def drop_unfused(module: nn.Module) -> int:
    """Remove the separate projections a fused one replaced, in every attention of `module`; the parameters
    freed. An attention whose fused layer is missing keeps its separate layers (it still runs on them)."""
    freed = 0
    for attn in module.modules():
        if not getattr(attn, "fused_projections", False):
            continue
        for fused, parts in FUSED_PROJECTIONS.items():
            if getattr(attn, fused, None) is None:
                continue
            for part in parts:
                layer = attn._modules.get(part)
                if layer is not None:
                    freed += sum(p.numel() for p in layer.parameters()) + sum(
                        b.numel() for b in layer.buffers()
                    )
                    del attn._modules[part]
    return freed


def fuse_projections(denoiser: nn.Module) -> bool:
    """diffusers' fusion of the denoiser's Q/K/V projections, then `drop_unfused`. False where the model has
    no fusion or its attention processors cannot fuse (it then runs unfused)."""
    if not hasattr(denoiser, "fuse_qkv_projections"):
        return False
    try:
        denoiser.fuse_qkv_projections()  # one GEMM for Q, K and V
    except Exception as e:
        logger.info("%s: Q/K/V projections stay unfused (%s)", type(denoiser).__name__, e)
        with contextlib.suppress(Exception):
            denoiser.unfuse_qkv_projections()
        return False
    freed = drop_unfused(denoiser)
    logger.debug("fused Q/K/V projections; dropped %.2f B unfused parameters", freed / 1e9)
    return True
