"""Atomic files and inter-process locks: what every cache write goes through.

A write goes to a temp file in the same folder, is fsynced, then renamed over the target: readers see the old
file or the new one, never a part. Shared files are guarded by a lock file beside them (`<name>.lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock

LOCK_TIMEOUT = 60.0


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.

    The bytes go to a temp file in the same folder, are fsynced, then renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; give the file the mode open() would. os.chmod, not os.fchmod: Windows has no
        # fchmod before Python 3.13.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it (before any long work starts)."""
    from ..errors import OutputError

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e
    return folder


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_path(path: str | Path) -> Path:
    """The lock file guarding `path`: `<name>.lock` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the inter-process lock of `path` (raises filelock.Timeout after `timeout` seconds)."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock, timeout=timeout):
        yield


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_sidecar(path: str | Path) -> Path:
    """Where `remembered_sha256` keeps a file's hash: `.<name>.sha256` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.sha256")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def remembered_sha256(path: str | Path) -> str:
    """sha256 of a file, read once: remembered in a small sidecar by (size, mtime_ns, inode).

    Hashing FLUX.1-dev's 23.8 GB of ONNX weights takes about a minute; a file whose size, modification time
    and inode are unchanged is not read again. A sidecar that is missing, unreadable or describes another
    state of the file means one fresh hash (and a new sidecar, where the folder is writable).
    """
    path = Path(path)
    sidecar = hash_sidecar(path)
    identity = _identity(path)
    try:
        known = json.loads(sidecar.read_text())
        if isinstance(known, dict) and {k: known.get(k) for k in identity} == identity:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    if _identity(path) == identity:  # not changed while it was read
        with contextlib.suppress(OSError):
            atomic_write_text(sidecar, json.dumps({**identity, "sha256": digest}))
    return digest
