"""Cross-attention on flash attention (attention_kernels.py; the torch backend's "auto" on Hopper).

Whether it pays is measured on the GPU (docs/benchmarks.md, "Attention plans, shape by shape"); here: every
cross-attention of a real diffusers UNet gets it and no self-attention does, the kernel it picks is flash
attention (CPU has one too), the output is the same, and torch.compile traces the kernel choice into the graph."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from pipeline.engines.attention_kernels import FlashCrossAttention, flash_cross_attention


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10.0]), torch.randn(1, 7, 32, generator=g)


FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


def _ops(fn) -> dict[str, int]:
    """Calls per aten op of `fn()`, run with math attention as the process's choice (as cuDNN is on the GPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return {event.key: event.count for event in prof.key_averages()}


def test_cross_attention_runs_flash_attention_and_gives_the_same_output() -> None:
    unet = _unet()
    sample, t, text = _inputs()
    with torch.inference_mode():
        before = unet(sample, t, text).sample
        default_ops = _ops(lambda: unet(sample, t, text))
    cross = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
    selfs = [m for m in unet.modules() if hasattr(m, "is_cross_attention") and not m.is_cross_attention]
    assert flash_cross_attention(unet) == len(cross) > 0 and selfs
    assert all(isinstance(m.processor, FlashCrossAttention) for m in cross)
    assert not any(isinstance(m.processor, FlashCrossAttention) for m in selfs)
    assert flash_cross_attention(unet) == 0  # once is enough
    with torch.inference_mode():
        after = unet(sample, t, text).sample
        pinned_ops = _ops(lambda: unet(sample, t, text))
    assert FLASH not in default_ops and default_ops[MATH] == len(cross) + len(selfs)
    assert pinned_ops[FLASH] == len(cross) and pinned_ops[MATH] == len(selfs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_kernel_choice() -> None:
    unet = _unet()
    flash_cross_attention(unet)
    text = _inputs()[2]
    block = unet.down_blocks[0].attentions[0]  # a Transformer2DModel: self- and cross-attention
    hidden = torch.randn(1, 32, 16, 16)
    with torch.inference_mode():
        expected = block(hidden, encoder_hidden_states=text, return_dict=False)[0]
        with sdpa_kernel([SDPBackend.MATH]):
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # traced with math as the
            got = compiled(hidden, encoder_hidden_states=text, return_dict=False)[
                0
            ]  # process's choice, as on the GPU
        ops = _ops(lambda: compiled(hidden, encoder_hidden_states=text, return_dict=False))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ops[FLASH] == 1  # the block's cross-attention; its self-attention is math, decomposed in the graph


def test_the_option_is_checked_and_changes_nothing_on_the_cpu() -> None:
    """`attention="cudnn-self"` is a torch-backend option; on the CPU (no cuDNN) attention is torch's own."""
    import pytest

    from pipeline.engines.torch_options import TorchOptions, choose_attention
    from pipeline.errors import InvalidInputError

    cpu = torch.device("cpu")
    assert TorchOptions.parse(cpu, {"attention": "cudnn-self"}).attention == "cudnn-self"
    assert choose_attention(cpu, "cudnn-self") == "default"
    with pytest.raises(InvalidInputError, match="cudnn-self"):
        TorchOptions.parse(cpu, {"attention": "cudnn-cross"})
