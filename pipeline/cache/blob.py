"""Cache files: a small self-describing container, read and written safely.

    magic b"ADCACHE\0" | format version (u32 LE) | header length (u32 LE) | header (UTF-8 JSON) | payload

The header holds platform_key, payload_size, sha256 (of the payload), created_at, tools, meta. Every read
checks magic, version, platform key and sha256; a bad file is a miss said in one warning line, never an
exception. Every write is atomic and locked (files.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError
from .files import LOCK_TIMEOUT, atomic_write_bytes, file_lock

logger = logging.getLogger("pipeline.cache")

BLOB_MAGIC = b"ADCACHE\x00"
BLOB_VERSION = 1
_BLOB_PREFIX = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER = 1 << 20


class BadCacheFile(ValueError):
    """A cache file that cannot be used; the message says why in a few words."""


@dataclass(frozen=True)
class BlobHeader:
    platform_key: str
    payload_size: int
    sha256: str
    created_at: str
    tools: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode_blob(
    data: bytes, platform_key: str, *, tools: dict[str, str] | None = None, meta: dict[str, Any] | None = None
) -> bytes:
    """The container bytes for `data` (what `save_blob` writes)."""
    header = BlobHeader(
        platform_key=platform_key,
        payload_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=_now(),
        tools=dict(tools or {}),
        meta=dict(meta or {}),
    )
    head = json.dumps(asdict(header), sort_keys=True).encode()
    return _BLOB_PREFIX.pack(BLOB_MAGIC, BLOB_VERSION, len(head)) + head + data


def decode_blob(raw: bytes, platform_key: str | None = None) -> tuple[BlobHeader, bytes]:
    """Check and split container bytes; raises BadCacheFile saying what is wrong."""
    header = _decode_header(raw)
    start = _BLOB_PREFIX.size + struct.unpack_from("<I", raw, 12)[0]
    payload = raw[start:]
    if len(payload) != header.payload_size:
        raise BadCacheFile(f"truncated: payload is {len(payload)} of {header.payload_size} bytes")
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise BadCacheFile("checksum mismatch (damaged file)")
    if platform_key is not None and header.platform_key != platform_key:
        raise BadCacheFile(f"made for platform {header.platform_key}, this is {platform_key}")
    return header, payload


def _decode_header(raw: bytes) -> BlobHeader:
    if len(raw) < _BLOB_PREFIX.size:
        raise BadCacheFile(f"truncated: {len(raw)} bytes, too short for a cache file")
    magic, version, head_len = _BLOB_PREFIX.unpack_from(raw)
    if magic != BLOB_MAGIC:
        raise BadCacheFile("not a cache file of this app (bad magic)")
    if version != BLOB_VERSION:
        raise BadCacheFile(f"format version {version}, this app reads version {BLOB_VERSION}")
    if head_len > _MAX_HEADER or len(raw) < _BLOB_PREFIX.size + head_len:
        raise BadCacheFile("truncated header")
    try:
        fields = json.loads(raw[_BLOB_PREFIX.size : _BLOB_PREFIX.size + head_len])
        return BlobHeader(**fields)
    except (ValueError, TypeError) as e:
        raise BadCacheFile(f"unreadable header ({e})") from e


def read_blob_header(path: str | Path) -> BlobHeader:
    """Only the header of a cache file (no checksum check): for listings. Raises BadCacheFile / OSError."""
    with Path(path).open("rb") as f:
        prefix = f.read(_BLOB_PREFIX.size)
        head_len = struct.unpack_from("<I", prefix, 12)[0] if len(prefix) == _BLOB_PREFIX.size else 0
        return _decode_header(prefix + f.read(min(head_len, _MAX_HEADER)))


HeaderCheck = Callable[[BlobHeader], "str | None"]  # why a whole, same-platform file still cannot be used


def _read_checked(path: Path, platform_key: str, timeout: float, check: HeaderCheck | None) -> bytes:
    """The payload of a whole cache file for `platform_key` that `check` accepts; raises BadCacheFile,
    OSError or CacheBusyError saying why not."""
    with file_lock(path, timeout, purpose="reading a cache file"):
        raw = path.read_bytes()
    header, payload = decode_blob(raw, platform_key)
    problem = check(header) if check is not None else None
    if problem:
        raise BadCacheFile(problem)
    return payload


def load_blob(
    path: str | Path,
    platform_key: str,
    *,
    timeout: float = LOCK_TIMEOUT,
    check: HeaderCheck | None = None,
) -> bytes | None:
    """The payload of the cache file at `path` if it is whole and made for `platform_key`, else None.

    A missing file is a quiet miss. A bad, truncated, foreign or locked-too-long file, or one `check` finds
    a problem with (e.g. made by a newer driver), is a miss with one warning line saying why; the next
    `save_blob` replaces it.
    """
    path = Path(path)
    if not path.is_file():
        logger.debug("no cache at %s", path)
        return None
    try:
        payload = _read_checked(path, platform_key, timeout, check)
    except (BadCacheFile, OSError, CacheBusyError) as e:
        logger.warning("ignoring cache %s: %s; a fresh one will be saved", path, _reason(e))
        return None
    logger.debug("loaded cache %s (%d bytes)", path, len(payload))
    return payload


def blob_problem(
    path: str | Path,
    platform_key: str,
    *,
    timeout: float = LOCK_TIMEOUT,
    check: HeaderCheck | None = None,
) -> str | None:
    """Why the cache file at `path` cannot be used for `platform_key`, or None when it can."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        _read_checked(path, platform_key, timeout, check)
    except (BadCacheFile, OSError, CacheBusyError) as e:
        return _reason(e)
    return None


def save_blob(
    path: str | Path,
    data: bytes,
    platform_key: str,
    *,
    meta: dict[str, Any] | None = None,
    tools: dict[str, str] | None = None,
    timeout: float = LOCK_TIMEOUT,
) -> bool:
    """Atomically replace the cache file at `path` under its lock. Returns False (one warning) when it
    cannot be written (disk full, read-only folder, lock held too long): a cache is never worth a crash."""
    path = Path(path)
    raw = encode_blob(data, platform_key, tools=tools, meta=meta)
    try:
        with file_lock(path, timeout, purpose="saving a cache file"):
            atomic_write_bytes(path, raw)
    except (OSError, CacheBusyError) as e:
        logger.warning("could not save cache %s: %s", path, _reason(e))
        return False
    logger.debug("saved cache %s (%d bytes)", path, len(data))
    return True


def _reason(e: BaseException) -> str:
    if isinstance(e, CacheBusyError):
        return str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
