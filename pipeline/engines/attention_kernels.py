"""Cross-attention on flash attention where self-attention runs cuDNN's (the torch backend's `attention="cudnn-self"`).

cuDNN's fused attention is the fastest kernel on Hopper, but it builds a plan for every new attention shape,
40-70 ms each, kept per thread for the process (docs/benchmarks.md, "Attention plans, shape by shape"). A UNet meets a
new self- and a new cross-attention shape at each of its levels when it meets a new size: SD 1.5 8 plans per
size, SDXL 4, a large part of the first call's penalty there. Cross-attention attends to the text's 77
tokens, so it is cheap in any kernel: at SD 1.5 768² (H200) its calls took 0.024 / 0.014 / 0.010 ms with
cuDNN against 0.036 / 0.017 / 0.011 ms with flash attention, a few milliseconds per 50-step call. Flash
attention needs no per-shape plan, so cross-attention runs it and a new size builds half the plans. What that
buys a new size on the GPU is not measured yet (the session that wrote it ran out of device time), so it is
an option, not the default.

The choice is made while a region is traced (`torch.nn.attention.sdpa_kernel`, which torch.compile follows),
so it is baked into the compiled code, and the processor's class is part of the region's artifact key.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

# flash first; memory-efficient attention where flash cannot run (an attention mask): neither builds plans
CROSS_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


class FlashCrossAttention:
    """An attention processor that runs another (diffusers') processor under flash attention."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        with sdpa_kernel(CROSS_ATTENTION_BACKENDS):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def flash_cross_attention(denoiser: nn.Module) -> int:
    """Give each cross-attention of `denoiser` (diffusers' `Attention` with `is_cross_attention`) flash
    attention; returns how many. FLUX has none: its joint attention is self-attention."""
    count = 0
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if not getattr(module, "is_cross_attention", False) or processor is None:
            continue
        if not isinstance(processor, FlashCrossAttention):
            module.set_processor(FlashCrossAttention(processor))
            count += 1
    if count:
        logger.debug("cross-attention on flash attention in %d attention modules", count)
    return count
