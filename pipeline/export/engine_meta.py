"""What a TensorRT-RTX engine is built for and from: its targets, and the metadata written beside it.

Targets are compute capabilities: the defaults (SM86, SM89, SM120) cover RTX 30/40/50, fp8 engines default to
SM89 and SM120 (FP8 needs compute capability 8.9), SM80 is added on request, and `current` builds for the
building machine's GPU. SM75 is refused: TensorRT-RTX 1.7 builds for it, but its runtime refuses compute
capability 7.5.

Beside each `<stage>.engine` lies `<stage>.json`: ONNX sha256, profile, targets, flags, precision,
TensorRT-RTX version, and the memory the build reported (BuildReport: weights, activations), which is the
stage's part of the memory plan (pipeline/engines/memory.py) checked before anything loads. A build is
skipped while that metadata matches the request; otherwise `why_rebuild` says which field changed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import remembered_sha256
from ..engines.rtx import trt
from ..errors import InvalidInputError

METADATA_FORMAT = 2
DEFAULT_TARGETS: tuple[str, ...] = ("sm86", "sm89", "sm120")
FP8_TARGETS: tuple[str, ...] = ("sm89", "sm120")  # FP8 tensor cores: compute capability 8.9 and newer
TARGETS = ("sm80", "sm86", "sm89", "sm120", "sm121", "current")
_REFUSED = {
    "sm75": "TensorRT-RTX 1.7 builds for SM75 but its runtime refuses compute capability 7.5 "
    "(it runs on 8.0, 8.6, 8.9 and 12.x)"
}
_NO_FP8 = ("sm80", "sm86")

Profile = Mapping[str, tuple[tuple[int, ...], ...]]  # input name -> (min, opt, max) shapes


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """'sm86,sm89' or ['SM86', 'sm89'] -> ('sm86', 'sm89'); unknown names raise InvalidInputError."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(dict.fromkeys(t.strip().lower() for t in items if t.strip()))
    for name in names:
        if name in _REFUSED:
            raise InvalidInputError(f"target {name}: {_REFUSED[name]}; drop it")
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown engine targets {unknown or items}; choose from {', '.join(TARGETS)}"
        )
    if "current" in names and len(names) > 1:
        raise InvalidInputError("target 'current' (this machine's GPU) cannot be combined with other targets")
    return names


def check_precision_targets(precision: str, targets: Sequence[str]) -> None:
    """fp8 engines need FP8 tensor cores (compute capability 8.9+): refuse older named targets."""
    old = [t for t in targets if t in _NO_FP8]
    if precision == "fp8" and old:
        raise InvalidInputError(
            f"fp8 engines need compute capability 8.9 or newer; drop {', '.join(old)} from the targets "
            f"(e.g. --targets {','.join(FP8_TARGETS)}) or build with --precision bf16"
        )


def default_targets(precision: str | None) -> tuple[str, ...]:
    return FP8_TARGETS if precision == "fp8" else DEFAULT_TARGETS


def external_data_files(model: Any) -> list[str]:
    """The external-data files an ONNX model (a ModelProto) names, relative to its folder, in name order."""
    import onnx

    return sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 over the ONNX file and the external-data files it names (in name order).

    Each file's hash is remembered beside it by (size, mtime_ns, inode): a start that finds FLUX's 23.8 GB of
    external data unchanged does not read it again.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError):  # not ONNX: hash the bytes; the parser says what is wrong
        return remembered_sha256(path)
    data_files = external_data_files(model)
    if not data_files:
        return remembered_sha256(path)
    digest = hashlib.sha256()
    for file in (path, *(path.parent / name for name in data_files)):
        digest.update(f"{file.name}:{remembered_sha256(file)}\n".encode())
    return digest.hexdigest()


def onnx_weights(onnx_path: str | Path) -> tuple[int, int]:
    """(total, largest) bytes of an ONNX file's initializers, read from the graph alone (no weights loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    sizes = []
    for tensor in model.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        sizes.append(count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return sum(sizes), max(sizes, default=0)


def engine_metadata(
    onnx_path: str | Path,
    profile: Profile,
    targets: Sequence[str],
    weight_streaming: bool,
    precision: str = "unknown",
    refittable: bool = False,
) -> dict[str, Any]:
    """What an engine is built from; a change in any field means a rebuild."""
    refit = {"refittable": True} if refittable else {}  # absent when False: older engines stay valid
    return {
        "format": METADATA_FORMAT,
        "tensorrt_rtx": trt.__version__,
        "onnx_sha256": onnx_sha256(onnx_path),
        "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
        "targets": list(targets),
        "weight_streaming": weight_streaming,
        "strongly_typed": True,
        "precision": precision,
        **refit,
    }


_REPORT_PATTERNS = {  # TensorRT-RTX 1.7's INFO lines at the end of a build
    "activation_bytes": re.compile(r"Total Activation Memory: (\d+) bytes"),
    "weights_bytes": re.compile(r"Total Weights Memory: (\d+) bytes"),
    "scratch_bytes": re.compile(r"Max Scratch Memory: (\d+) bytes"),
    "device_persistent_bytes": re.compile(r"Total Device Persistent Memory: (\d+) bytes"),
}


@dataclass(frozen=True)
class BuildReport:
    """What TensorRT-RTX's builder says about an engine's device memory (its INFO log; the largest value
    over the targets). Activation memory is for the profile's largest shapes; 0 where it said nothing."""

    activation_bytes: int = 0
    weights_bytes: int = 0
    scratch_bytes: int = 0
    device_persistent_bytes: int = 0

    @classmethod
    def parse(cls, messages: Iterable[str]) -> BuildReport:
        found = dict.fromkeys(_REPORT_PATTERNS, 0)
        for message in messages:
            for key, pattern in _REPORT_PATTERNS.items():
                match = pattern.search(message)
                if match:
                    found[key] = max(found[key], int(match.group(1)))
        return cls(**found)


def why_rebuild(old: dict[str, Any] | None, new: dict[str, Any], engine_path: Path) -> str | None:
    """None when `old` describes `new` and the engine file exists; else the reason, in a few words."""
    if not engine_path.is_file():
        return "no engine yet"
    if old is None:
        return "no readable metadata beside the engine"
    changes = []
    for key, value in new.items():
        if old.get(key) != value:
            if key == "onnx_sha256":
                changes.append("ONNX changed")
            elif key in ("targets", "tensorrt_rtx", "weight_streaming", "precision", "refittable"):
                changes.append(f"{key} changed ({old.get(key)} -> {value})")
            else:
                changes.append(f"{key} changed")
    return ", ".join(changes) or None
