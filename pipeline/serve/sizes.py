"""The shapes a server has served, remembered across restarts, so that a restarted server warms them up.

A server's first request at a size its process has not met pays that size's set-up even with a full compile
cache: the step's CUDA graph and cuDNN's plans are made per process (warming.py; SD 1.5 at 768²: 1.6-1.9x its
steady time). So the worker counts the shapes it serves, (width, height, images per call), and merges the
counts into `<cache root>/serve-sizes/<model key>.json` (locked, written atomically) at most every `FLUSH_S`
and when it stops: a killed server loses at most that much counting. Replicas sharing a cache root add up.

At start, once the `--warm-size` warm-up is done and /health says ok, the worker warms the `--warm-recent`
most served of them (3 by default), one at a time and only while no request is waiting: a request that
arrives meanwhile waits for at most one warm-up call (two steps, warming.py). The file keeps the `KEEP`
most served shapes, so requests at ever new sizes cannot grow it. A file that cannot be read is said once
in the log and replaced at the next merge.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache.files import atomic_write_text, file_lock

logger = logging.getLogger("pipeline.serve")

FLUSH_S = 30.0
KEEP = 64
VERSION = 1


@dataclass(frozen=True, order=True)
class Shape:
    """What a pipeline call's graph and plans are made for: the image size and the images in the call."""

    width: int
    height: int
    images: int = 1


class ServedSizes:
    """Counts of the shapes served, in this process and (merged) in `path`; None: counted, never kept."""

    def __init__(self, path: Path | None, flush_s: float = FLUSH_S) -> None:
        self.path = path
        self.flush_s = flush_s
        self._unsaved: Counter[Shape] = Counter()
        self._last_flush = time.monotonic()

    def record(self, shape: Shape) -> None:
        """Count one call at `shape`; merge into the file if the last merge is `flush_s` old."""
        self._unsaved[shape] += 1
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Merge this process's unsaved counts into the file (never raises: a failure is a log line)."""
        self._last_flush = time.monotonic()
        if self.path is None or not self._unsaved:
            return
        try:
            with file_lock(self.path, purpose="counting the sizes a server served"):
                counts = self._read() + self._unsaved
                atomic_write_text(self.path, _encode(counts))
            self._unsaved.clear()
        except Exception as e:  # counting must never fail a request
            logger.warning("could not save the served sizes to %s (%s: %s)", self.path, type(e).__name__, e)

    def most_served(self, n: int, exclude: set[Shape] | frozenset[Shape] = frozenset()) -> list[Shape]:
        """The `n` most served shapes in the file, most first (ties: the smaller shape first)."""
        if n <= 0 or self.path is None:
            return []
        counts = self._read()
        ranked = sorted((s for s in counts if s not in exclude), key=lambda s: (-counts[s], s))
        return ranked[:n]

    def _read(self) -> Counter[Shape]:
        if self.path is None or not self.path.exists():
            return Counter()
        try:
            return _decode(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            logger.warning(
                "ignoring %s, which cannot be read (%s); it is rewritten at the next save", self.path, e
            )
            return Counter()


def _encode(counts: Counter[Shape]) -> str:
    kept = sorted(counts, key=lambda s: (-counts[s], s))[:KEEP]
    rows = [{"width": s.width, "height": s.height, "images": s.images, "count": counts[s]} for s in kept]
    return json.dumps({"version": VERSION, "shapes": rows}, indent=1) + "\n"


def _decode(data: Any) -> Counter[Shape]:
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("shapes"), list)
    ):
        raise ValueError(f"not a version {VERSION} sizes file")
    counts: Counter[Shape] = Counter()
    for row in data["shapes"]:
        values = [row[k] for k in ("width", "height", "images", "count")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"bad entry {row!r}")
        counts[Shape(*values[:3])] += values[3]
    return counts
