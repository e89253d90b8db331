"""fp8 dynamic quantization of Linear layers (float8_e4m3fn): weights quantized once with one scale per
output channel, activations on every call with one scale per row (token), so an outlier token does not
crush the others. The fp8 weights replace the bf16 ones (memory goes down).

Two kernels, same scheme:
- "torchao": torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` (pip extra `fp8`).
- "scaled_mm": our own small module over `torch._scaled_mm` (below), which needs nothing beyond torch.
`DEFAULT_KERNEL` is our own: on the H200 (torch 2.11, torchao 0.18, FLUX.1-dev 1024², 2026-12-01)
torchao's Float8Tensor weights could not be compiled ahead of time (aten.empty_like is not implemented for
them), and their JIT compile took more than 2 minutes per block kind, where ours compiles ahead of time like
bf16. torchao stays selectable (`fp8_kernel="torchao"`); scripts/bench.py measures both side by side.
Inside a compiled region the activation quantization (amax, divide, cast) fuses into one kernel before the
fp8 matrix product. Needs a GPU with fp8 matrix units (compute capability 8.9 or newer).

Every Linear layer of at least 512 x 512 is quantized, the adaLN modulation layers included: they multiply one
row per image, so they are bound by reading their weights, which fp8 halves (3.2 B of FLUX.1-dev's 11.9 B
parameters are theirs). Fused Q/K/V layers are built from the quantized ones (`fuse_fp8_projections`): the
per-channel scales concatenate with the rows. `quantize_linears(..., device=)` touches only layers already on
`device`, so a model can be quantized part by part while it loads (loading.py): the bf16 weights of the whole
model are never on the GPU at once, and loading peaks at the fp8 model plus one block.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_FEATURES = 512  # smaller layers gain nothing from fp8 and lose accuracy


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether `device` has fp8 matrix units, and why not when it has none."""
    if device.type != "cuda":
        return False, f"fp8 needs a CUDA GPU with compute capability 8.9 or newer; device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"fp8 needs compute capability 8.9 or newer; this GPU has {major}.{minor}"
    return True, f"compute capability {major}.{minor}"


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> fp8 values and (M, 1) float32 scales with x ~= q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """A Linear whose matrix product runs in fp8 with row-wise activation and per-channel weight scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.out_dtype = linear.weight.dtype
        q, scale = _quantize_rows(linear.weight.detach())  # (N, K): one scale per output channel
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, N)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @classmethod
    def concat(cls, layers: list[Fp8Linear]) -> Fp8Linear:
        """One layer whose output rows are `layers`' outputs one after another (a fused Q/K/V projection)."""
        first = layers[0]
        if any(layer.in_features != first.in_features or (layer.bias is None) != (first.bias is None)
               for layer in layers):  # fmt: skip
            raise ValueError("only layers of one input width, all with or all without bias, concatenate")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = first.in_features
        fused.out_features = sum(layer.out_features for layer in layers)
        fused.out_dtype = first.out_dtype
        fused.register_buffer("weight_fp8", torch.cat([layer.weight_fp8 for layer in layers]))
        fused.register_buffer("weight_scale", torch.cat([layer.weight_scale for layer in layers], dim=1))
        bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
        fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = _quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q,
            self.weight_fp8.t(),  # (K, N) column-major, as cuBLASLt wants it
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device`, where "cuda" means the current CUDA device."""
    if tensor.device.type != device.type:
        return False
    if device.type != "cuda" or device.index is None:
        return device.type != "cuda" or tensor.device.index == torch.cuda.current_device()
    return tensor.device.index == device.index


def _eligible(linear: nn.Linear, device: torch.device | None) -> bool:
    if device is not None and not _on(linear.weight, device):
        return False  # not loaded yet (meta, or still on the host)
    n, k = linear.out_features, linear.in_features
    return n >= MIN_FEATURES and k >= MIN_FEATURES and n % 16 == 0 and k % 16 == 0


def torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return False
    return True


DEFAULT_KERNEL = "scaled_mm"


def quantize_linears(
    module: nn.Module, kernel: str = "scaled_mm", device: torch.device | None = None, quiet: bool = False
) -> int:
    """Quantize the eligible nn.Linear layers of `module` (those on `device` only, when given) to fp8 in
    place with `kernel` ("torchao" or "scaled_mm"). Returns how many were quantized.

    Each bf16 layer is released as soon as its fp8 one replaces it (no list of the originals is kept)."""
    if kernel == "torchao":
        return _quantize_torchao(module, device)
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _eligible(child, device):
                setattr(parent, child_name, Fp8Linear(child))
                count += 1
    if not quiet:
        logger.info("fp8: quantized %d linear layers", count)
    return count


def fuse_fp8_projections(module: nn.Module) -> int:
    """Fuse each attention's quantized Q/K/V (and FLUX's added Q/K/V) layers into one fp8 layer, as
    diffusers' `fuse_projections` does for bf16 ones, and drop the separate layers. Only for attentions that
    read their fused layers when `fused_projections` is set (diffusers' AttentionModuleMixin ones, FLUX's).
    Returns how many attentions were fused."""
    from .fusion import FUSED_PROJECTIONS

    count = 0
    for attn in module.modules():
        if getattr(attn, "fused_projections", True) or not getattr(attn, "_supports_qkv_fusion", False):
            continue
        fused_any = False
        for fused, parts in FUSED_PROJECTIONS.items():
            if fused == "to_kv":
                continue  # cross-attention: diffusers' processors for it switch classes, not a flag
            layers = [attn._modules.get(p) for p in parts]
            if all(isinstance(layer, Fp8Linear) for layer in layers):
                setattr(attn, fused, Fp8Linear.concat(layers))
                for p in parts:
                    del attn._modules[p]
                fused_any = True
        if fused_any:
            attn.fused_projections = True
            count += 1
    return count


def _quantize_torchao(module: nn.Module, device: torch.device | None) -> int:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen: list[str] = []

    def eligible(child: nn.Module, name: str) -> bool:
        ok = type(child) is nn.Linear and _eligible(child, device)
        if ok:
            chosen.append(name)
        return ok

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
    logger.info("fp8 (torchao, per-row): quantized %d linear layers", len(chosen))
    return len(chosen)
