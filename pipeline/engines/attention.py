"""Attention whose kernel each thread chooses at run time, inside compiled regions.

Compiled code bakes torch's attention backend in when it is traced: `F.scaled_dot_product_attention` becomes
the cuDNN (or flash) kernel's op in the graph. cuDNN's fused attention is the fastest on Hopper, but it builds
an execution plan for every new shape, about 40-60 ms each, and torch keeps those plans per thread. At a new
image size SD 1.5's UNet meets about eight new attention shapes: the first 768² call after 512² spent 0.45 s
building plans (H200, 2026-12-02/03: the same call with flash attention, which has no per-shape plans, paid
0.07 s over its steady time, but flash runs 768² 17% slower steady).

So families that opt in (`Family.fresh_shape_attention`) trace their regions with `redirect_sdpa()`, which
puts `attention` below in the graph: a custom op, opaque to the compiler, that calls the kernel the running
thread asked for with `use_backend` (default: the process-wide choice, `torch_options.choose_attention`). The
torch backend captures a new size's CUDA graph with flash attention, serving that call without plans, and a
thread of its own captures the same step again with cuDNN (graph_upgrade.py); the faster graph is swapped in
between calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

OP_NAME = "adaptive_diffusion::attention"
_local = threading.local()  # .backend: this thread's choice ("flash"); None: the process-wide flags
_redirect_lock = threading.Lock()
_redirect_depth = 0
_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The op's output layout: (B, H, S, D) over (B, S, H, D) memory, what flash attention returns and what
    cuDNN returns for diffusers' head-split views, so the reshape after attention is a view."""
    b, h, s, _ = query.shape
    return query.new_empty((b, s, h, value.shape[-1]), dtype=query.dtype).transpose(1, 2)


def _flash_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    d = query.shape[-1]
    return (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and key.dtype == query.dtype == value.dtype
        and d == key.shape[-1] == value.shape[-1]
        and d % 8 == 0
        and d <= 256
    )


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(Q Kᵀ · scale) V over (B, H, S, D) tensors, with the kernel this thread chose."""
    if getattr(_local, "backend", None) == "flash" and _flash_fits(query, key, value):
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)[0]
    else:  # torch's own choice under the process-wide flags (cuDNN where choose_attention set it)
        out = _ORIGINAL_SDPA(query, key, value, scale=scale)
    expected = _output_like(query, value)
    if out.stride() == expected.stride():
        return out
    return expected.copy_(out)  # another layout: compiled code reads the layout the fake promised


@attention.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    return _output_like(query, value)


def _redirected_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` while regions are traced: plain attention goes to `attention`, the
    rest (masks, dropout, causal, grouped heads, other ranks) to torch's function unchanged."""
    plain = attn_mask is None and dropout_p == 0.0 and not is_causal and not enable_gqa
    if plain and query.dim() == key.dim() == value.dim() == 4:
        return attention(query, key, value, scale)
    return _ORIGINAL_SDPA(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


@contextlib.contextmanager
def redirect_sdpa(enabled: bool = True) -> Iterator[None]:
    """Inside, `torch.nn.functional.scaled_dot_product_attention` is `_redirected_sdpa` (process-wide, as
    diffusers' processors look it up per call; nested and concurrent uses share one patch)."""
    global _redirect_depth
    if not enabled:
        yield
        return
    with _redirect_lock:
        _redirect_depth += 1
        F.scaled_dot_product_attention = _redirected_sdpa
    try:
        yield
    finally:
        with _redirect_lock:
            _redirect_depth -= 1
            if _redirect_depth == 0:
                F.scaled_dot_product_attention = _ORIGINAL_SDPA


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """This thread's `attention` calls use `backend` ("flash"; None: the process-wide flags) inside."""
    previous = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def current_backend() -> str | None:
    return getattr(_local, "backend", None)
