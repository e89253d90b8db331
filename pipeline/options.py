"""The few words every entry point parses the same way: devices, dtypes, image sizes and seeds.

One convention for sizes, everywhere (CLI, export, prewarm, bench, server): **WIDTHxHEIGHT**, as the OpenAI
Images API, A1111 and ComfyUI write them ("1024x768" is 1024 wide, 768 tall).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .families import Family

SEED_RANGE = 2**64  # seeds are in [0, 2**64): what torch.Generator.manual_seed takes

# The model dtypes, by their short names (what the CLI, export and the metadata say).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES: dict[str, str] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> 'fp32' | 'fp16' | 'bf16' (InvalidInputError for any other)."""
    if dtype not in _NAMES:
        raise InvalidInputError(f"dtype {dtype} is not a model dtype; choose one of {', '.join(DTYPES)}")
    return _NAMES[dtype]


def parse_dtype(
    dtype: str | torch.dtype | None, device: torch.device, family: Family | None = None
) -> torch.dtype:
    """A model dtype from a name ('bf16', 'bfloat16', ...) or a torch dtype; None: the default for `device`
    (float32 on CPU, the family's GPU dtype on CUDA)."""
    if dtype is None:
        if device.type == "cpu" or family is None:
            return torch.float32
        return family.default_cuda_dtype
    if isinstance(dtype, torch.dtype):
        dtype_name(dtype)
        return dtype
    if not isinstance(dtype, str):
        raise InvalidInputError(f"dtype must be a name or a torch dtype, got {dtype!r}")
    key = dtype.lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_device(device: str | torch.device | None) -> torch.device:
    """'cuda', 'cuda:1', 'cpu' or a torch.device; None: cuda when a GPU is visible, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"unknown device {device!r} ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                "device cuda was asked for, but no CUDA GPU is available here; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {dev} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return dev


def parse_size(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or a (width, height) pair) -> (width, height), both positive integers."""
    if isinstance(text, tuple | list):
        parts = list(text)
    else:
        parts = str(text).strip().lower().split("x")
    try:
        width, height = (int(v) for v in parts)
    except (ValueError, TypeError):
        raise InvalidInputError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1024x768") from None
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"size {text!r} must be positive, WIDTHxHEIGHT, e.g. 1024x768")
    return width, height


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,1024x768' -> [(512, 512), (1024, 768)] as (width, height) pairs."""
    items = [item for item in str(text).split(",") if item.strip()]
    if not items:
        raise InvalidInputError(f"no sizes in {text!r}; give WIDTHxHEIGHT[,WIDTHxHEIGHT...]")
    return [parse_size(item) for item in items]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed: object, count: int = 1) -> int:
    """`seed` if it is a whole number in [0, 2**64) leaving room for `count` consecutive seeds (image i of
    a call uses seed + i); else InvalidInputError."""
    if not _is_int(seed) or not 0 <= seed or seed + max(count, 1) - 1 >= SEED_RANGE:  # type: ignore[operator]
        room = f" (and seed + {count - 1} too, for {count} images)" if count > 1 else ""
        raise InvalidInputError(f"seed must be a whole number in [0, 2**64){room}, got {seed!r}")
    return seed  # type: ignore[return-value]


def parse_seed(text: str | int) -> int:
    """A seed from the command line ('42') or a number; InvalidInputError outside [0, 2**64)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise InvalidInputError(f"seed must be a whole number in [0, 2**64), got {text!r}") from None
    return check_seed(value)
