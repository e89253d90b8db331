"""Finding a LoRA file (local file, folder, Hugging Face hub id) and reading the CLI's PATH[:SCALE]."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraError

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def check_scale(value: Any, what: str = "LoRA scale") -> float:
    """A LoRA scale: a finite number >= 0, else LoraError."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise LoraError(f"{what} must be a finite number >= 0, got {value!r}")
    return scale


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` (the CLI's --lora) -> (path, scale); a path ending in .safetensors takes no split."""
    path, sep, scale = text.rpartition(":")
    if not sep or text.lower().endswith(".safetensors") or "/" in scale or "\\" in scale:
        return text, 1.0
    if not path:
        raise LoraError(f"--lora {text!r}: give a file, e.g. --lora style.safetensors:0.8")
    return path, check_scale(scale, f"--lora {text}: the scale")


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def _pick(folder: Path, weight_name: str | None, where: str) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise LoraError(f"{where} has no file {weight_name}")
        return path
    files = sorted(folder.glob("*.safetensors"))
    if (folder / DEFAULT_WEIGHT_NAME).is_file():
        return folder / DEFAULT_WEIGHT_NAME
    if len(files) == 1:
        return files[0]
    if not files:
        raise LoraError(f"{where} holds no .safetensors LoRA file")
    raise LoraError(f"{where} holds {len(files)} .safetensors files; name one with weight_name=")


def _download(repo_id: str, weight_name: str | None, local_files_only: bool) -> Path:
    from ..loading import hub_snapshot

    folder = hub_snapshot(
        repo_id,
        [weight_name or "*.safetensors"],
        local_files_only=local_files_only,
        error=LoraError,
        what="LoRA",
        alternative="a local .safetensors file",
    )
    return _pick(folder, weight_name, f"LoRA {repo_id}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_lora(
    path_or_id: str | Path, weight_name: str | None = None, *, local_files_only: bool = False
) -> LoraFile:
    """A .safetensors file, a folder holding one, or a Hugging Face hub id -> LoraFile (path + sha256)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        path = _pick(path, weight_name, f"LoRA folder {path}")
    elif not path.exists():
        name = str(path_or_id)
        if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith(".safetensors"):
            raise LoraError(f"LoRA file {path} does not exist")
        path = _download(name, weight_name, local_files_only)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path.name}: only .safetensors LoRA files are read (pickled files can run code)")
    return LoraFile(path.resolve(), sha256_of(path))
