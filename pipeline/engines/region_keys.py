"""What a compiled region's artifact depends on, and the one input layout it is called with.

`block_fingerprint` and `call_signature` make up an artifact's key in the compile cache (torch_compile.py):
everything compiled code bakes in that its kept guards do not check. `canonical_inputs` gives every region
input one memory layout per call structure (row-major, or channels-last for a channels-last 4-D tensor) with
dense strides, so equal calls always meet equal guards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_SCALARS = (bool, int, float, str, type(None))


def _attribute_value(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):  # activation functions and the like
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return None


def block_fingerprint(block: nn.Module) -> str:
    """Everything about a block that compiled code bakes in: its classes, non-tensor attributes, attention
    processors, and the names, shapes and dtypes of its parameters and buffers. Blocks with equal
    fingerprints can share an artifact."""
    h = hashlib.sha256()
    for name, module in block.named_modules():
        h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}\n".encode())
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or attr == "training":
                continue
            described = _attribute_value(value)
            if described is not None:
                h.update(f"  {attr}={described!r}\n".encode())
        processor = getattr(module, "processor", None)
        if processor is not None:
            h.update(f"  processor={type(processor).__qualname__}\n".encode())
    for name, tensor in (*block.named_parameters(), *block.named_buffers()):
        layout = ":channels_last" if is_channels_last(tensor) else ""
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{type(tensor).__name__}{layout}\n".encode())
    return h.hexdigest()[:20]


def _describe_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        layout = ("channels_last",) if is_channels_last(value) else ()
        return ("T", value.dim(), str(value.dtype), value.device.type, *layout)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_describe_input(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _describe_input(v)) for k, v in value.items())))
    return ("V", repr(value))


def call_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The structure of a call (tensor ranks, dtypes, devices; other values as such), not its sizes."""
    text = repr((tuple(_describe_input(a) for a in args), _describe_input(kwargs)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical_strides(shape: Sequence[int], order: Sequence[int]) -> list[int]:
    """Dense strides for `shape` laid out with dims `order` from outermost to innermost; a size-1 dim's
    stride is free in torch but not in guards, so it gets the dense value too."""
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return strides


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def canonical_inputs(value: Any) -> Any:
    """One memory layout per input: row-major, or channels-last for a 4-D tensor already in it (a
    channels-last UNet's activations: converting them would cost a copy per region call)."""
    if isinstance(value, torch.Tensor):
        if is_channels_last(value):
            order: Sequence[int] = (0, 2, 3, 1)
        elif not value.is_contiguous():
            return value.contiguous()
        else:
            order = range(value.dim())
        strides = _canonical_strides(value.shape, order)
        return value if value.stride() == tuple(strides) else value.as_strided(value.shape, strides)
    if isinstance(value, tuple):
        return tuple(canonical_inputs(v) for v in value)
    if isinstance(value, list):
        return [canonical_inputs(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical_inputs(v) for k, v in value.items()}
    return value
