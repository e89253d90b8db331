"""The PNG files behind `url` responses: written atomically, named by a random id, the oldest pruned.

Replicas on one host may share the folder (each prunes only what it wrote). Replicas on several hosts each
keep their own: there, ask for `b64_json` or put the folder on a shared filesystem.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import deque
from pathlib import Path

from ..cache import atomic_write_bytes, ensure_writable_dir

logger = logging.getLogger("pipeline.serve")

_ID = re.compile(r"^[0-9a-f]{32}$")


class ImageStore:
    def __init__(self, folder: str | Path, keep: int) -> None:
        self.folder = ensure_writable_dir(folder)
        self.keep = keep
        self._mine: deque[str] = deque()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        """Write one PNG (temp file + rename: never half-written) and return its id."""
        image_id = uuid.uuid4().hex
        atomic_write_bytes(self.folder / f"{image_id}.png", png)
        with self._lock:
            self._mine.append(image_id)
            old = [self._mine.popleft() for _ in range(max(0, len(self._mine) - self.keep))]
        for gone in old:
            (self.folder / f"{gone}.png").unlink(missing_ok=True)
        return image_id

    def path(self, image_id: str) -> Path | None:
        """The file of `image_id`, or None for an unknown (or malformed: never a path outside) id."""
        if not _ID.match(image_id):
            return None
        path = self.folder / f"{image_id}.png"
        return path if path.is_file() else None
