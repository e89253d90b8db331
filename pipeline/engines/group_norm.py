"""GroupNorm for large images on CUDA: the VAE decoder's statistics from torch's general reductions.

torch's CUDA GroupNorm computes each (image, group) pair's moments in one thread block
(`RowwiseMomentsCUDAKernel`). A VAE decoder at 1024² has 32 such rows of 4-16 M values each, so 32 blocks
run on a GPU of 132 SMs: on the H200 (torch 2.11, 2026-12-03, FLUX's VAE decoder, bf16, 128² latents) those
kernels took 44.6 ms of an 84.8 ms NCHW decode, and channels-last inputs add a layout copy per norm (128.7 ms).
torch's reductions (`mean`, `vector_norm`) split a long row over many blocks, and eval-mode `batch_norm`
applies per-channel statistics in one elementwise pass: four memory-bound passes, and the decode takes 43 ms
(docs/h200/vae_group_norm.json; in the pipeline the VAE stage went from 0.149 to 0.067 s).

Hand-written because neither torch nor diffusers has a GroupNorm kernel that parallelizes within a group;
Inductor's would, but compiling the VAE costs its first call 42-45 s (torch_options.py).

Numerics: the sums accumulate in float32 (`dtype=torch.float32`, no float32 copy of the input), the
normalization runs in float32 inside `batch_norm` and rounds once to the input's dtype, like torch's own
kernel. Only CUDA tensors take this path: on the CPU `nn.GroupNorm` runs unchanged, so the float32 reference
images still equal diffusers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` with group statistics from split reductions."""
    n, c = x.shape[:2]
    if x.is_contiguous():
        grouped, dims = x.view(n, groups, -1), (2,)
        flat = x.view(1, n * c, *x.shape[2:])  # batch_norm over n*c "channels": one pass, any batch size
    elif n == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        grouped, dims = x.permute(0, 2, 3, 1).view(n, -1, groups, c // groups), (1, 3)
        flat = x
    else:
        return F.group_norm(x, groups, weight, bias, eps)
    count = grouped.numel() // (n * groups)
    mean = grouped.mean(dim=dims, dtype=torch.float32)  # (n, groups)
    mean_sq = torch.linalg.vector_norm(grouped, dim=dims, dtype=torch.float32).square_() / count
    var = (mean_sq - mean.square()).clamp_(min=0.0)
    per_channel = c // groups
    mean_c = mean.repeat_interleave(per_channel, dim=1).reshape(-1)  # (n * c,)
    var_c = var.repeat_interleave(per_channel, dim=1).reshape(-1)
    weight_c = None if weight is None else weight.float().repeat(n)
    bias_c = None if bias is None else bias.float().repeat(n)
    out = F.batch_norm(flat, mean_c, var_c, weight_c, bias_c, training=False, eps=eps)
    return out.view_as(x) if out.shape != x.shape else out


class WideGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that takes `group_norm` above on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or x.dim() < 3:
            return super().forward(x)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def widen_group_norms(module: nn.Module) -> int:
    """Make every nn.GroupNorm in `module` a WideGroupNorm in place (parameters kept). Returns how many."""
    return _swap_class(module, nn.GroupNorm, WideGroupNorm)


def restore_group_norms(module: nn.Module) -> int:
    """Undo `widen_group_norms` (torch's kernel again, as a plain diffusers module has). Returns how many."""
    return _swap_class(module, WideGroupNorm, nn.GroupNorm)


def _swap_class(module: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    count = 0
    for m in module.modules():
        if type(m) is old:
            m.__class__ = new
            count += 1
    return count
