"""FLUX's joint attention in float8 (fp8_attention.py, the torch backend's `attention="fp8"`).

cuDNN's kernel runs only on a GPU (scripts/attention_probe.py and scripts/bench.py measure it there). Here, on
a real diffusers FluxTransformer2DModel: the processor is diffusers' own computation with the attention
quantized (fused and unfused projections), the op's float32 reference equals exact attention on the
dequantized inputs, the quantization's error is what e4m3 allows, and torch.compile traces the op whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from pipeline import InvalidInputError, Pipeline
from pipeline.engines.fp8_attention import (
    FP8,
    Fp8AttentionUnavailable,
    Fp8JointAttention,
    quantize_per_tensor,
    use_fp8_attention,
)


def _flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def _inputs(tokens: int = 64, text: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    side = int(tokens**0.5)
    ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"),
        -1,
    )
    return {
        "hidden_states": torch.randn(1, tokens, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantization_is_within_e4m3s_rounding() -> None:
    x = torch.randn(2, 64, 4, 16) * 3
    x8, descale = quantize_per_tensor(x)
    assert x8.dtype == FP8 and descale.shape == (1,) and descale.dtype == torch.float32
    assert float(x8.float().abs().max()) == 448.0  # the largest value maps to e4m3's largest
    back = x8.float() * descale
    assert _rel(back, x) < 2**-4  # 3 mantissa bits: at most 1/16 relative per element
    assert torch.isfinite(quantize_per_tensor(torch.zeros(3))[0].float()).all()  # an all-zero tensor


def test_the_op_is_attention_on_the_dequantized_inputs() -> None:
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = torch.ops.adaptive_diffusion.sdpa_fp8(q8, k8, v8, dq, dk, dv, 0.25, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # (batch, tokens, heads, head) memory: flatten(2, 3) is free
    exact = F.scaled_dot_product_attention(q8.float() * dq, k8.float() * dk, v8.float() * dv, scale=0.25)
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)  # bf16's rounding only
    assert _rel(out.float(), F.scaled_dot_product_attention(q, k, v, scale=0.25)) < 0.1


@pytest.mark.parametrize("fused", [False, True])
def test_the_processor_is_diffusers_flux_attention_quantized(fused: bool) -> None:
    model, inputs = _flux(), _inputs()
    if fused:
        model.fuse_qkv_projections()
    with torch.inference_mode():
        expected = model(**inputs).sample
        count = use_fp8_attention(model)
        got = model(**inputs).sample
    assert count == 3  # one double block, two single blocks
    assert all(isinstance(m.processor, Fp8JointAttention) for m in model.modules() if hasattr(m, "processor"))
    assert use_fp8_attention(model) == 0  # once is enough
    assert 0 < _rel(got, expected) < 0.05  # quantized, yet the same attention


def test_an_attention_mask_is_refused() -> None:
    model = _flux()
    use_fp8_attention(model)
    attn = model.transformer_blocks[0].attn
    with pytest.raises(Fp8AttentionUnavailable, match="mask"):
        attn.processor(attn, torch.randn(1, 4, 32), torch.randn(1, 2, 32), attention_mask=torch.ones(1, 6))


def test_torch_compile_traces_the_op_whole() -> None:
    model, inputs = _flux(), _inputs()
    use_fp8_attention(model)
    block = model.single_transformer_blocks[0]
    hidden = torch.randn(1, 71, 32)
    temb = torch.randn(1, 32)
    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    with torch.inference_mode():
        expected = block(hidden[:, 7:], hidden[:, :7], temb, image_rotary_emb=rope)
        compiled = torch.compile(block, fullgraph=True, backend="inductor")
        got = compiled(hidden[:, 7:], hidden[:, :7], temb, image_rotary_emb=rope)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_the_pipeline_runs_it_compiled_and_refuses_it_without_flux(
    tiny_flux: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32, "cache_dir": tmp_path}
    request = {
        "prompt": "a red fox",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "output_type": "np",
    }
    plain = Pipeline.from_pretrained(tiny_flux, **kwargs)
    fp8 = Pipeline.from_pretrained(tiny_flux, **kwargs, attention="fp8", compile=True)
    assert "fp8" in fp8.backend.tag  # its compiled regions are kept apart from bf16 attention's
    denoiser = fp8.backend.modules["transformer"]
    assert all(
        isinstance(m.processor, Fp8JointAttention) for m in denoiser.modules() if hasattr(m, "processor")
    )
    expected = plain(**request, generator=torch.Generator().manual_seed(0)).images
    got = fp8(**request, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(got - expected).max() < 0.05  # a 2-step image in [0, 1], attention quantized
    with pytest.raises(InvalidInputError, match="FLUX's joint attention"):
        Pipeline.from_pretrained(tiny_sd, **kwargs, attention="fp8")
