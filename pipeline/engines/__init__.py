"""Backends: `rtx` (TensorRT-RTX engines) and `torch` (the modules, compiled where it helps)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import BackendUnavailableError, InvalidInputError
from ..families import Family
from .base import Backend, Engine, Precision, Specialization

logger = logging.getLogger("pipeline")

BACKENDS = ("auto", "rtx", "torch")

__all__ = ["BACKENDS", "Backend", "Engine", "Precision", "Specialization", "choose_backend", "create_backend"]


def _rtx_supported(device: torch.device) -> tuple[bool, str]:
    try:
        from .rtx import rtx_supported
    except ImportError as e:  # tensorrt_rtx missing or broken
        return False, f"tensorrt_rtx is not importable ({e})"
    if device.type != "cuda":
        return False, f"device is {device.type}, TensorRT-RTX needs a CUDA GPU"
    return rtx_supported(device)


def choose_backend(backend: str, device: torch.device) -> str:
    """Resolve 'auto' and check an explicit choice; says which and why in one log line."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    ok, why = _rtx_supported(device)
    if backend == "rtx":
        if not ok:
            raise BackendUnavailableError(f"backend rtx cannot run here: {why}; use --backend torch")
        return "rtx"
    chosen = "rtx" if ok else "torch"
    logger.info("backend auto -> %s (%s)", chosen, why)
    return chosen


def create_backend(
    name: str, family: Family, device: torch.device, dtype: torch.dtype, **options: Any
) -> Backend:
    if name == "rtx":
        from .rtx_backend import RtxBackend

        return RtxBackend(family, device, dtype, **options)
    from .rtx_backend import RTX_OPTIONS
    from .torch_engine import TorchBackend

    # rtx-only options (a VRAM budget, engine targets) mean nothing to the torch backend: said, then dropped;
    # build=True ("build what is missing") holds for it trivially
    options.pop("build", None)
    dropped = sorted(k for k in RTX_OPTIONS if options.pop(k, None) not in (None, False))
    if dropped:
        logger.warning("options %s apply to the rtx backend only; ignored", ", ".join(dropped))
    return TorchBackend(family, device, dtype, **options)
