"""Prewarmed caches shipped with the app (`caches/` + manifest.json), and choosing the cache to start from."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError
from .blob import BadCacheFile, BlobHeader, _reason, blob_problem, decode_blob
from .files import LOCK_TIMEOUT, atomic_write_bytes, atomic_write_text, file_lock, sha256_file
from .store import ModelCache

logger = logging.getLogger("pipeline.cache")

SHIPPED_ENV = "ADAPTIVE_DIFFUSION_SHIPPED_CACHES"
MANIFEST_VERSION = 1
SHIPPED_FILE = "runtime.cache"


def shipped_caches_dir() -> Path:
    """The prewarmed caches shipped with the app: $ADAPTIVE_DIFFUSION_SHIPPED_CACHES, else `caches/` beside
    the `pipeline` package (the repository root for a source checkout or an editable install)."""
    env = os.environ.get(SHIPPED_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "caches"


@dataclass
class ShippedCache:
    """One entry of caches/manifest.json: a prewarmed cache for one model on one platform."""

    model_id: str
    model_hash: str
    model_key: str
    platform_key: str
    backend: str
    precision: str
    platform: dict[str, Any] = field(default_factory=dict)
    shapes: list[dict[str, int]] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "size"}

    @property
    def folder(self) -> str:
        """Folder of this entry's files, relative to the shipped caches folder."""
        return f"{self.model_key}/{self.platform_key}"

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ShippedCache:
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_manifest(shipped_dir: str | Path) -> list[ShippedCache]:
    """The entries of `<shipped_dir>/manifest.json`; [] when it is missing. Raises BadCacheFile if damaged."""
    path = Path(shipped_dir) / "manifest.json"
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list):
            raise TypeError("the manifest is not a list")
        return [ShippedCache.from_json(e) for e in entries]
    except (ValueError, TypeError, OSError) as e:
        raise BadCacheFile(f"{path} is not a valid manifest ({e})") from e


def update_manifest(shipped_dir: str | Path, entry: ShippedCache, *, timeout: float = LOCK_TIMEOUT) -> None:
    """Add `entry` to the manifest, replacing any entry for the same model and platform (atomic, locked).

    Raises CacheBusyError when another process holds the manifest for longer than `timeout` seconds."""
    path = Path(shipped_dir) / "manifest.json"
    with file_lock(path, timeout, purpose=f"adding {entry.folder} to the manifest"):
        entries = [
            e
            for e in read_manifest(shipped_dir)
            if (e.model_key, e.platform_key) != (entry.model_key, entry.platform_key)
        ]
        entries.append(entry)
        entries.sort(key=lambda e: (e.model_key, e.platform_key))
        atomic_write_text(path, json.dumps([asdict(e) for e in entries], indent=2) + "\n")


def resolve_runtime_cache(model_cache: ModelCache, shipped_dir: str | Path | None = None) -> Path | None:
    """The runtime cache to start from: the user's if valid, else a matching shipped one copied into the
    user's cache (the shipped file is never changed), else None (start fresh).

    A damaged user cache and any shipped cache for this model that does not fit are skipped with one line
    saying why.
    """
    target = model_cache.runtime_cache_path
    if target.is_file():
        problem = blob_problem(target, model_cache.platform_key, check=header_check(model_cache))
        if problem is None:
            return target
        logger.warning("ignoring cache %s: %s", target, problem)
    shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_caches_dir()
    source = _matching_shipped(model_cache, shipped_dir)
    if source is None:
        return None
    try:
        data = source.read_bytes()
        with file_lock(target, purpose="copying a shipped cache in"):
            atomic_write_bytes(target, data)
    except (OSError, CacheBusyError) as e:
        logger.warning("could not copy shipped cache %s: %s", source, _reason(e))
        return None
    logger.info("starting from shipped cache %s", source)
    return target


def _matching_shipped(model_cache: ModelCache, shipped_dir: Path) -> Path | None:
    try:
        entries = read_manifest(shipped_dir)
    except BadCacheFile as e:
        logger.warning("skipping shipped caches: %s", e)
        return None
    model_name = model_cache.model_key.rsplit("-", 1)[0]
    for entry in entries:
        if entry.model_key != model_cache.model_key:
            if entry.model_key.rsplit("-", 1)[0] == model_name:
                logger.info(
                    "skipping shipped cache %s: made from other weights or configs (hash %s, this is %s)",
                    entry.folder,
                    entry.model_hash,
                    model_cache.model_key.rsplit("-", 1)[1],
                )
            continue
        if entry.platform_key != model_cache.platform_key:
            logger.info(
                "skipping shipped cache %s: made for another platform (this is %s)",
                entry.folder,
                model_cache.platform_key,
            )
            continue
        problem = model_cache.driver_problem(entry.platform.get("driver_version"))
        if problem:
            logger.info("skipping shipped cache %s: %s", entry.folder, problem)
            continue
        path = shipped_dir / entry.folder / SHIPPED_FILE
        problem = _shipped_problem(entry, path, model_cache)
        if problem:
            logger.warning("skipping shipped cache %s: %s", path, problem)
            continue
        return path
    return None


def header_check(model_cache: ModelCache) -> Callable[[BlobHeader], str | None]:
    """The check of a cache file's header beyond its platform key: the driver that made it (rtx)."""
    return lambda header: model_cache.driver_problem(header.meta.get("driver_version"))


def _shipped_problem(entry: ShippedCache, path: Path, model_cache: ModelCache) -> str | None:
    expected = entry.files.get(SHIPPED_FILE, {}).get("sha256")
    if not path.is_file():
        return "listed in the manifest but missing"
    if not expected:
        return "the manifest has no sha256 for it"
    if sha256_file(path) != expected:
        return "sha256 differs from the manifest (damaged or edited)"
    try:
        header, _ = decode_blob(path.read_bytes(), model_cache.platform_key)
    except BadCacheFile as e:
        return str(e)
    return header_check(model_cache)(header)
