"""The sha256 of large files, computed once and remembered: what makes a model key change with any byte.

Hashing FLUX.1-dev's 24 GB of weights takes a minute or so, once. The result is remembered in one small JSON
file in the cache root (`file-hashes.json`, written atomically under its lock) by the file's identity: path,
size, mtime_ns, ctime_ns and inode. ctime is in the key because copying with `cp -p` keeps the size, inode and
mtime of a rewritten file, but the kernel always moves ctime. A file changed less than SETTLE_S before it was
hashed is not remembered (a write within the filesystem's timestamp granularity would otherwise go unseen).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError
from .files import atomic_write_text, file_lock

logger = logging.getLogger(__name__)

HASHES_FILE = "file-hashes.json"
HASHES_FORMAT = 1
SETTLE_S = 2.0  # the coarsest common timestamp granularity (FAT, some network filesystems)
_CHUNK = 8 << 20


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != HASHES_FORMAT
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return data["files"]


def _sha256(path: Path, size: int) -> str:
    if size >= 1 << 30:
        logger.info("hashing %s (%.1f GB) once, to tell these weights from any others", path, size / 1e9)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class FileHashes:
    """sha256 of files by identity, remembered in `<root>/file-hashes.json`.

    `digest(path)` returns the remembered hash when the file's identity is unchanged (counted in `hits`),
    else reads the whole file (counted in `misses`); `save()` records the new ones.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / HASHES_FILE
        self._known = _read(self.path)
        self._new: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0

    def digest(self, file: str | Path) -> str:
        file = Path(file).resolve()
        stat = file.stat()
        identity = _identity(stat)
        entry = self._known.get(str(file))
        if entry is not None and {k: entry.get(k) for k in identity} == identity:
            self.hits += 1
            return str(entry["sha256"])
        self.misses += 1
        started = time.time()
        digest = _sha256(file, stat.st_size)
        if max(stat.st_mtime, stat.st_ctime) < started - SETTLE_S:
            self._new[str(file)] = {**identity, "sha256": digest}
        return digest

    def save(self) -> None:
        """Merge what was hashed into the file (other processes' entries kept; entries of removed files
        dropped). A cache of hashes is never worth an error: a failure costs a re-hash next time."""
        if not self._new:
            return
        with contextlib.suppress(OSError, CacheBusyError):
            with file_lock(self.path, 10.0, purpose="recording weight-file hashes"):
                files = {k: v for k, v in _read(self.path).items() if Path(k).exists()}
                files.update(self._new)
                data = {"format": HASHES_FORMAT, "files": dict(sorted(files.items()))}
                atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
            self._known.update(self._new)
            self._new.clear()
