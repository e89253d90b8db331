"""Where the app keeps what it makes: models, ONNX, engines, runtime and compile caches."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "ADAPTIVE_DIFFUSION_CACHE_DIR"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else $ADAPTIVE_DIFFUSION_CACHE_DIR, else the user cache dir."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("adaptive-diffusion")
    return Path(cache_dir).expanduser()
