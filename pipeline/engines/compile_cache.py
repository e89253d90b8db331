"""The torch backend's compile cache: ahead-of-time compiled regions plus Inductor's own artifacts, in the
model's ONE cache file per platform (pipeline/cache: locked, atomic, validated container).

The payload is an archive of named artifacts:

    b"ADAOTAR1" | header length (u32 LE) | header (JSON: entries [{key, group, size, sha256}]) | bytes...

- `<group>/<sha>`: one ahead-of-time compiled region (torch_compile.py); a group is one block kind with one
  call structure, and may hold several artifacts (shape classes: batch 1, batch > 1, static sizes).
- `native/<path>`: a shared object Inductor compiled for a CPU kernel, at its path under Inductor's cache
  folder. torch's precompile artifacts hold CPU kernels as C++ source, compiled again at load (a minute on a
  small CPU), so the compiled library is kept too and put back before the artifact loads.
- `inductor/<sha>`: what `torch.compiler.save_cache_artifacts()` returned in one process (kernels of regions
  on the JIT fallback, autotuning results); loaded with `load_cache_artifacts`. The newest few are kept.

Saving merges: under the file's lock, the entries already in the file are kept and this process's new ones
added, so a process that served fewer shapes never drops what others saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from ..cache import (
    BadCacheFile,
    atomic_write_bytes,
    decode_blob,
    encode_blob,
    file_lock,
    load_blob,
    tool_versions,
)

logger = logging.getLogger(__name__)

ARCHIVE_MAGIC = b"ADAOTAR1"
_PREFIX = struct.Struct("<8sI")
INDUCTOR_GROUP = "inductor"
NATIVE_GROUP = "native"
KEEP_INDUCTOR = 4  # newest Inductor cache snapshots kept in the file


@dataclass
class ArtifactStore:
    """Named artifacts in insertion order, with what this process added since loading."""

    entries: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # key -> (group, data)
    added: list[str] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)

    # ---- access ---------------------------------------------------------------------------------------------
    def keys(self, group: str) -> list[str]:
        return [key for key, (g, _) in self.entries.items() if g == group]

    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for g, _ in self.entries.values()))

    def get(self, key: str) -> bytes:
        return self.entries[key][1]

    def add(self, group: str, data: bytes) -> str:
        key = f"{group}/{hashlib.sha256(data).hexdigest()[:16]}"
        if key not in self.entries:
            self.entries[key] = (group, data)
            self.added.append(key)
        return key

    def put(self, key: str, group: str, data: bytes) -> None:
        """Store `data` under a key of the caller's choosing (replacing what it held)."""
        if self.entries.get(key) != (group, data):
            self.entries[key] = (group, data)
            self.added.append(key)

    def discard(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.removed.add(key)

    @property
    def dirty(self) -> bool:
        return bool(self.added or self.removed)

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.entries.values())

    # ---- bytes ----------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        index, chunks = [], []
        for key, (group, data) in self.entries.items():
            index.append({"key": key, "group": group, "size": len(data), "sha256": _sha(data)})
            chunks.append(data)
        head = json.dumps({"entries": index}).encode()
        return _PREFIX.pack(ARCHIVE_MAGIC, len(head)) + head + b"".join(chunks)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ArtifactStore:
        """Parse an archive; raises BadCacheFile (the caller starts fresh)."""
        if len(raw) < _PREFIX.size:
            raise BadCacheFile("too short for a compile-cache archive")
        magic, head_len = _PREFIX.unpack_from(raw)
        if magic != ARCHIVE_MAGIC:
            raise BadCacheFile("not a compile-cache archive of this version (older format?)")
        try:
            index = json.loads(raw[_PREFIX.size : _PREFIX.size + head_len])["entries"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadCacheFile(f"unreadable archive index ({e})") from e
        store, offset = cls(), _PREFIX.size + head_len
        for item in index:
            data = raw[offset : offset + item["size"]]
            offset += item["size"]
            if len(data) != item["size"] or _sha(data) != item["sha256"]:
                raise BadCacheFile(f"artifact {item['key']} is damaged")
            store.entries[item["key"]] = (item["group"], data)
        return store

    def merged_into(self, theirs: ArtifactStore | None) -> ArtifactStore:
        """`theirs` (what the file holds now) plus what this process added, minus what it removed."""
        out = ArtifactStore()
        if theirs is not None:
            for key, value in theirs.entries.items():
                if key not in self.removed:
                    out.entries[key] = value
        for key in self.added:
            if key in self.entries:
                out.entries[key] = self.entries[key]
        inductor = out.keys(INDUCTOR_GROUP)
        for key in inductor[:-KEEP_INDUCTOR]:
            del out.entries[key]
        return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_store(path: Path, platform_key: str) -> ArtifactStore:
    """The archive in the cache file at `path`, or an empty store (a missing or bad file is a miss, said in
    one line by load_blob or here)."""
    payload = load_blob(path, platform_key)
    if payload is None:
        return ArtifactStore()
    try:
        return ArtifactStore.from_bytes(payload)
    except BadCacheFile as e:
        logger.warning("ignoring compile cache %s: %s; a fresh one will be saved", path, e)
        return ArtifactStore()


def save_store(store: ArtifactStore, path: Path, platform_key: str, meta: dict[str, Any]) -> bool:
    """Merge this process's artifacts into the file at `path` (read-modify-write under its lock)."""
    if not store.dirty:
        return False
    try:
        with file_lock(path):
            theirs = None
            if path.is_file():
                try:
                    _, payload = decode_blob(path.read_bytes(), platform_key)
                    theirs = ArtifactStore.from_bytes(payload)
                except (BadCacheFile, OSError) as e:
                    logger.info("replacing compile cache %s (%s)", path, e)
            merged = store.merged_into(theirs)
            data = merged.to_bytes()
            meta = dict(meta, artifacts=len(merged.entries))
            atomic_write_bytes(path, encode_blob(data, platform_key, tools=tool_versions("torch"), meta=meta))
    except (OSError, filelock.Timeout) as e:
        logger.warning("could not save compile cache %s: %s", path, e)
        return False
    store.entries = dict(merged.entries)
    store.added.clear()
    store.removed.clear()
    logger.info("saved compile cache %s (%d artifacts, %.1f MB)", path, len(merged.entries), len(data) / 1e6)
    return True
