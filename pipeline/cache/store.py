"""The cache folder: where one model's ONNX, engines and runtime / compile cache live on one platform.

<root>/models/<built-in model>/                   built-in random-weight models
<root>/<model-key>/onnx/<stage>.onnx (+ data, manifest.json)
<root>/<model-key>/engines/<platform-key>/<stage>.engine + <stage>.json
<root>/<model-key>/runtime/<platform-key>.cache   ONE runtime / compile cache for all stages
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from .files import sweep_temps
from .platform import driver_problem, platform_info

if TYPE_CHECKING:
    import torch

    from ..loading import ModelSource

CACHE_ENV = "ADAPTIVE_DIFFUSION_CACHE_DIR"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else $ADAPTIVE_DIFFUSION_CACHE_DIR, else the user cache dir."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("adaptive-diffusion")
    return Path(cache_dir).expanduser()


def model_key(source: ModelSource) -> str:
    """`<model id made filesystem-safe>-<content hash>`, e.g. `black-forest-labs--FLUX.1-dev-0123abcd...`."""
    model_id = source.model_id
    if "/" in model_id and (Path(model_id).is_absolute() or model_id.startswith((".", "~"))):
        model_id = Path(model_id).name  # a local folder: its name, not the whole path
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.replace("/", "--")).lstrip("._-")[:64] or "model"
    return f"{name}-{source.content_hash}"


@dataclass(frozen=True)
class ModelCache:
    """The paths of one model on one platform inside the cache root.

    `driver_version`: the NVIDIA driver here (rtx caches record the one that made them; see platform.py)."""

    root: Path
    model_key: str
    platform_key: str
    driver_version: str | None = None

    @classmethod
    def for_model(
        cls,
        source: ModelSource,
        backend: str,
        device: torch.device | str,
        cache_dir: str | Path | None = None,
    ) -> ModelCache:
        info = platform_info(backend, device)
        return cls(cache_root(cache_dir), model_key(source), info.key, info.driver_version)

    @property
    def backend(self) -> str:
        return self.platform_key.split("-", 1)[0]

    def driver_problem(self, made_with: str | None) -> str | None:
        """Why a cache made under NVIDIA driver `made_with` cannot serve here (rtx: needs a driver at least as
        new; torch: any driver), or None."""
        return driver_problem(made_with, self.driver_version) if self.backend == "rtx" else None

    def sweep_leftovers(self) -> list[Path]:
        """Remove what killed processes left in this model's folders (stale, unlocked temp files)."""
        folders = (
            self.runtime_cache_path.parent,
            self.engine_dir,
            self.onnx_dir,
            self.root / "models",
            self.root,
        )
        return [path for folder in folders for path in sweep_temps(folder)]

    @property
    def model_dir(self) -> Path:
        return Path(self.root) / self.model_key

    @property
    def onnx_dir(self) -> Path:
        return self.model_dir / "onnx"

    @property
    def engine_dir(self) -> Path:
        return self.model_dir / "engines" / self.platform_key

    @property
    def runtime_cache_path(self) -> Path:
        """One runtime (rtx) or compile (torch) cache for all stages of the model on this platform."""
        return self.model_dir / "runtime" / f"{self.platform_key}.cache"
