"""TensorRT-RTX, imported once, and whether it and an engine file can run here.

`trt` is the `tensorrt_rtx` module (None where it does not import: the torch backend still works, and
`rtx_supported(device)` says why). `TrtLogger` routes the library's messages to `logging`. An engine that
cannot run here raises `StaleEngineError` where a rebuild can fix it, `EngineUnusableError` where it cannot
(`check_validity`, from `Runtime.get_engine_validity`). The engine itself is `RtxEngine` (rtx_engine.py).

Only the documented tensorrt_rtx 1.7 Python API is used. It runs on GPUs of compute capability 8.0, 8.6, 8.9
and 12.x; `rtx_supported(device)` says whether a device is one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailableError, PipelineError

try:
    import tensorrt_rtx as trt
except ImportError as _e:  # the torch backend still works; rtx_supported() says why rtx does not
    trt = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

logger = logging.getLogger(__name__)

__all__ = [
    "EngineUnusableError",
    "StaleEngineError",
    "TrtLogger",
    "check_validity",
    "invalidity_reasons",
    "require_trt",
    "rtx_supported",
    "trt",
]

SUPPORTED_CC = ((8, 0), (8, 6), (8, 9))  # plus every 12.x


class StaleEngineError(PipelineError):
    """An engine file cannot run here but a rebuild can fix it (other TensorRT-RTX version or GPU, damaged)."""


class EngineUnusableError(PipelineError):
    """An engine cannot run here and a rebuild would not help (GPU memory, driver, CUDA error)."""


# ---- TensorRT-RTX logging -----------------------------------------------------------------------------------
if trt is not None:

    class TrtLogger(trt.ILogger):
        """Routes TensorRT-RTX messages to `logging` (debug), keeps the errors for our own messages and the
        builder's memory report (INFO lines naming memory) for the engine metadata."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.infos: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.INFO and "Memory" in msg:
                self.infos.append(msg)
            logger.debug("TensorRT-RTX [%s] %s", severity.name, msg)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from TensorRT-RTX"

else:  # importable everywhere (the torch backend's machines import every rtx module); usable nowhere

    class TrtLogger:  # type: ignore[no-redef]
        def __init__(self) -> None:
            raise RuntimeError(f"tensorrt_rtx is not importable ({_IMPORT_ERROR})")


# ---- can it run here ----------------------------------------------------------------------------------------
def require_trt(purpose: str = "building engines") -> None:
    """One line, before any long work, where tensorrt_rtx does not import (an engine build needs it even on
    a machine whose GPU it cannot run on)."""
    if trt is None:
        raise BackendUnavailableError(
            f"{purpose} needs TensorRT-RTX, which does not import here ({_IMPORT_ERROR}); pip install tensorrt-rtx"
        )


def rtx_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, why) when tensorrt_rtx imports and `device` (default: the current CUDA device) is a GPU it runs
    on; else (False, why not)."""
    if trt is None:
        return False, f"tensorrt_rtx is not importable ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return False, f"device is {device.type}, TensorRT-RTX needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    where = f"{name} (compute capability {major}.{minor})"
    if (major, minor) in SUPPORTED_CC or major == 12:
        return True, f"TensorRT-RTX {trt.__version__} runs on {where}"
    return False, f"TensorRT-RTX {trt.__version__} does not run on {where}; it needs 8.0, 8.6, 8.9 or 12.x"


# ---- can this engine run here -------------------------------------------------------------------------------
# What each EngineInvalidityDiagnostics flag means for the user: can a rebuild with this machine's library,
# for this GPU, help (True), or not (False: the message says what to do instead)?
_REBUILD_HELPS = {
    "VERSION_MISMATCH": (True, "built by another TensorRT-RTX version"),
    "UNSUPPORTED_CC": (True, "not built for this GPU's compute capability"),
    "MALFORMED_ENGINE": (True, "the file is damaged"),
    "OLD_CUDA_RUNTIME": (True, "built against a newer CUDA runtime than this one"),
    "OLD_CUDA_DRIVER": (False, "the NVIDIA driver is too old for it: update the driver"),
    "INSUFFICIENT_GPU_MEMORY": (False, "the GPU has too little free memory for it: free GPU memory, or use "
                                "fp8 engines, --low-vram or a --vram-budget"),
    "CUDA_ERROR": (False, "CUDA reported an error while checking it: check the driver and the GPU "
                   "(nvidia-smi)"),
}  # fmt: skip


def invalidity_reasons(diagnostics: int) -> tuple[list[str], list[str]]:
    """Split an `EngineInvalidityDiagnostics` bit set into (reasons a rebuild fixes, reasons it does not)."""
    rebuild, blocking = [], []
    for name, flag in trt.EngineInvalidityDiagnostics.__members__.items():
        if int(diagnostics) & int(flag):
            helps, words = _REBUILD_HELPS.get(name, (False, name.lower().replace("_", " ")))
            (rebuild if helps else blocking).append(words)
    return rebuild, blocking


def check_validity(data: bytes | memoryview, path: str | Path = "engine") -> None:
    """Raise unless `Runtime.get_engine_validity` says the engine can run here: StaleEngineError when a
    rebuild can help, EngineUnusableError when it cannot (run under the engine's device guard)."""
    runtime = trt.Runtime(TrtLogger())
    validity, diagnostics = runtime.get_engine_validity(data)
    if validity == trt.EngineValidity.INVALID:
        rebuild, blocking = invalidity_reasons(int(diagnostics))
        if blocking or not rebuild:
            raise EngineUnusableError(f"{path} cannot run here: {'; '.join(blocking) or 'invalid'}")
        raise StaleEngineError(f"{path} cannot run here ({', '.join(rebuild)}); rebuild it")
    if validity == trt.EngineValidity.SUBOPTIMAL:
        logger.info("%s runs here but may be slower than an engine built for this GPU", path)


# ---- its data types as torch's (engines and refit) ----------------------------------------------------------
def _torch_dtypes() -> dict[Any, torch.dtype]:
    return {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
