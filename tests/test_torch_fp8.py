"""The torch backend's fp8 modules on the CPU: Fp8Linear against nn.Linear, fused Q/K/V without the layers
they replace, and quantization while loading (the same model as quantizing after loading, never more than
one block's bf16 Linear layers materialized at once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.architectures import build_random
from pipeline.engines.fp8 import FP8, Fp8Linear, quantize_linears
from pipeline.engines.fusion import fuse_projections
from pipeline.engines.torch_engine import _fp8_part
from pipeline.loading import module_parts

CPU = torch.device("cpu")


def _scaled_mm_runs_on_cpu() -> bool:
    try:
        a = torch.ones(16, 16).to(FP8)
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_scaled_mm = pytest.mark.skipif(
    not _scaled_mm_runs_on_cpu(), reason="torch._scaled_mm has no CPU kernel"
)


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX transformer config whose attention and MLP layers are wide enough (512) to be quantized."""
    from diffusers import FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("wide-flux")
    config = dict(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=8,
        joint_attention_dim=512, pooled_projection_dim=64, axes_dims_rope=(8, 28, 28), guidance_embeds=True,
    )  # fmt: skip
    with torch.device("meta"):
        FluxTransformer2DModel(**config).save_config(folder)
    return folder


def _build(folder: Path, per_part: object = None) -> nn.Module:
    return build_random("diffusers", "FluxTransformer2DModel", folder, torch.bfloat16, CPU, per_part=per_part)


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    c = model.config
    return {
        "hidden_states": torch.randn(1, 64, c.in_channels, generator=gen).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim, generator=gen).bfloat16(),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=gen).bfloat16(),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(64, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


def test_fused_projections_drop_the_layers_they_replace(wide_flux: Path) -> None:
    model = _build(wide_flux)
    x = _inputs(model)
    with torch.no_grad():
        reference = model(**x).sample
        before = sum(p.numel() for p in model.parameters())
        assert fuse_projections(model)
        after = sum(p.numel() for p in model.parameters())
        fused = model(**x).sample
    attn = model.transformer_blocks[0].attn
    assert hasattr(attn, "to_qkv") and hasattr(attn, "to_added_qkv")
    assert not any(
        hasattr(attn, n) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    )
    assert after == before  # the fused layers hold exactly what the dropped ones held
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)  # bf16: one GEMM instead of three


@needs_scaled_mm
def test_fp8_linear_matches_linear_within_fp8_error() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(512, 1024, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=gen)
    x = torch.randn(4, 7, 512, generator=gen)
    q = Fp8Linear(linear)
    assert q.weight_fp8.dtype == FP8 and q.weight_fp8.element_size() == 1
    error = (q(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.06  # e4m3: 3 mantissa bits on both operands


@needs_scaled_mm
def test_fp8_while_loading_is_the_fp8_model_and_never_holds_it_whole_in_bf16(wide_flux: Path) -> None:
    whole = _build(wide_flux)
    fuse_projections(whole)
    quantize_linears(whole)

    def wide(module: nn.Module) -> int:  # materialized bf16 Linear layers of at least 512 x 512
        return sum(
            1
            for m in module.modules()
            if type(m) is nn.Linear and m.weight.device == CPU and min(m.weight.shape) >= 512
        )

    bf16 = _build(wide_flux)
    largest_part = max(wide(part) for part, recurse in module_parts(bf16) if recurse)
    seen: list[int] = []

    def counting(module: nn.Module) -> None:
        seen.append(wide(module))  # before this part is quantized
        _fp8_part(module, device=CPU)

    streamed = _build(wide_flux, per_part=counting)
    # at any moment, only the part just allocated is in bf16: never the whole model
    assert max(seen) == largest_part < wide(bf16)
    assert {n for n, _ in streamed.named_modules()} == {n for n, _ in whole.named_modules()}
    for (name, a), (_, b) in zip(whole.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(a.float(), b.float()), name
    x = _inputs(whole)
    with torch.no_grad():
        torch.testing.assert_close(streamed(**x).sample, whole(**x).sample, rtol=0, atol=0)


def test_random_weights_do_not_depend_on_loading_in_parts(wide_flux: Path) -> None:
    whole, parts = _build(wide_flux), _build(wide_flux, per_part=lambda m: None)
    for (name, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_quantize_linears_touches_only_layers_on_the_given_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    model[0].to_empty(device=CPU)
    assert quantize_linears(model, device=CPU) == 1
    assert isinstance(model[0], Fp8Linear) and type(model[1]) is nn.Linear
