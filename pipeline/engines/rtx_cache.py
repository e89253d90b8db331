"""The one TensorRT-RTX runtime cache shared by every stage of a pipeline, persisted in one file.

The kernels TensorRT-RTX JIT-compiled are read once from the file under a lock and written once at `save()`
/ `close()` / context exit (temp file + rename, under the lock). A corrupt file, or one from another GPU or
TensorRT-RTX version, or one made by a newer driver than this one, is one warning and a fresh cache,
replaced on save. The file is pipeline.cache's container (magic, platform key, sha256, the driver it was
made with).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..cache import driver_problem, load_blob, platform_info, save_blob

logger = logging.getLogger(__name__)


class RuntimeCache:
    """The one TensorRT-RTX runtime cache shared by every stage of a pipeline, persisted in one file.

    The file is read once here; the `IRuntimeCache` is created with the first engine's runtime config (the
    API creates it from an `IRuntimeConfig`) and attached to every engine's config. `save()` writes it back
    once; `close()` and leaving a `with` block save too.
    """

    def __init__(self, path: str | Path, key: str | None = None, driver_version: str | None = None) -> None:
        self.path = Path(path)
        if key is None:
            info = platform_info("rtx", torch.device("cuda"))
            key, driver_version = info.key, info.driver_version
        self.key = key
        self.driver_version = driver_version  # recorded on save; a cache needs a driver at least this new
        self._blob = load_blob(
            self.path, self.key, check=lambda h: driver_problem(h.meta.get("driver_version"), driver_version)
        )
        self._cache: Any = None  # trt.IRuntimeCache
        self._owner: Any = None  # the IRuntimeConfig that created it, kept alive with it
        self._closed = False

    @property
    def loaded_bytes(self) -> int:
        return len(self._blob or b"")

    def attach(self, runtime_config: Any) -> None:
        """Make `runtime_config` (an IRuntimeConfig) use the shared cache, creating it on first use."""
        if self._cache is None:
            cache = runtime_config.create_runtime_cache()
            if cache is None:
                raise RuntimeError("TensorRT-RTX could not create a runtime cache")
            if self._blob and not cache.deserialize(self._blob):
                logger.warning(
                    "runtime cache %s does not fit this GPU, driver or TensorRT-RTX version; "
                    "starting a fresh one, replaced on save",
                    self.path,
                )
                cache.reset()
            self._cache, self._owner = cache, runtime_config
            self._blob = None
        if not runtime_config.set_runtime_cache(self._cache):
            raise RuntimeError("TensorRT-RTX refused to attach the runtime cache to a runtime config")

    def save(self) -> bool:
        """Write the cache file (lock + atomic replace); False when nothing to save or it cannot be written."""
        if self._cache is None:
            return False
        blob = bytes(memoryview(self._cache.serialize()))
        meta = {"kind": "tensorrt_rtx runtime cache", "driver_version": self.driver_version}
        if not save_blob(self.path, blob, self.key, meta=meta):
            return False
        logger.info("saved runtime cache (%.1f MB) to %s", len(blob) / 1e6, self.path)
        return True

    def close(self) -> None:
        """Save once; later calls do nothing."""
        if not self._closed:
            self._closed = True
            self.save()

    def __enter__(self) -> RuntimeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
