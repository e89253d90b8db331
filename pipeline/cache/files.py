"""Atomic files, inter-process locks, and sweeping what killed processes left behind.

A write goes to a temp file `.<name>.<random>.tmp` in the same folder, is fsynced, then renamed over the
target: readers see the old file or the new one, never a part. Shared files are guarded by a lock file beside
them (`<name>.lock`), which holds who holds it (pid, host, purpose, since) and is removed on release, so no
lock file stays behind. A process that finds a lock held says what it waits for, and for whom.

A process killed mid-write leaves its temp file (or temp folder) behind; `sweep_temps` removes such leftovers
once they are stale (untouched for STALE_AFTER_S) and their target is not locked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError

logger = logging.getLogger(__name__)

# Cache files are held for a read or a write (well under a second for a runtime cache); a process that waits
# longer than this gives up with CacheBusyError (callers treat that as a cache miss).
LOCK_TIMEOUT = 60.0
WAIT_NOTICE_S = 30.0  # a process waiting without a bound says so again this often
_POLL_S = 0.05
# A temp file untouched this long whose target is unlocked belongs to a dead process: the slowest write seen
# (24 GB of FLUX.1-dev ONNX external data) touched its files every few milliseconds.
STALE_AFTER_S = 15 * 60.0
# `.<target>.<8 random chars>.tmp`: what atomic_write_bytes and the temp folders of exports and models make
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # what open() and mkdir() leave out of a new file's mode


def temp_prefix(target: str | Path) -> str:
    """The name prefix of temp files and folders made for `target` (`tempfile.mk*temp(prefix=...)`)."""
    return f".{Path(target).name}."


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.

    The bytes go to a temp file in the same folder, are fsynced, then renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; give the file the mode open() would. os.chmod, not os.fchmod: Windows has no
        # fchmod before Python 3.13.
        os.chmod(tmp, 0o666 & ~UMASK)
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


# ---- locks ----------------------------------------------------------------------------------------------


def lock_path(path: str | Path) -> Path:
    """The lock file guarding `path`: `<name>.lock` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class _Lock:
    """One attempt-at-a-time lock on `<name>.lock`; `try_acquire` never blocks.

    POSIX: `flock` on the lock file, whose content names the holder. Release unlinks the file while still
    holding it; a process that opened the old file before the unlink finds, once it gets the flock, that its
    file is no longer the one at the path, and tries again. So the file can be removed without two holders.
    Elsewhere (Windows): filelock, which removes the file on release too; the holder is not known there.
    """

    def __init__(self, path: Path, purpose: str) -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None
        self._other: object | None = None

    def try_acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:
            return self._try_filelock()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(current, os.fstat(fd)):  # released and unlinked meanwhile
            os.close(fd)
            return False
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose}
        holder["since"] = time.strftime("%H:%M:%S")
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        return True

    def _try_filelock(self) -> bool:
        import filelock

        lock = filelock.FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return False
        self._other = lock
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: see the class docstring
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        elif self._other is not None:
            self._other.release()  # type: ignore[attr-defined]
            self._other = None


def lock_holder(path: str | Path) -> str:
    """Who holds the lock of `path`, in a few words ('pid 123 on host, exporting ONNX, since 10:02:03')."""
    try:
        info = json.loads(lock_path(path).read_text())
        words = [f"pid {info['pid']}"]
        if info.get("host") and info["host"] != socket.gethostname():
            words[0] += f" on {info['host']}"
        words += [str(info["purpose"])] if info.get("purpose") else []
        words += [f"since {info['since']}"] if info.get("since") else []
        return ", ".join(words)
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


_held = threading.local()


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = LOCK_TIMEOUT, *, purpose: str = "") -> Iterator[None]:
    """Hold the inter-process lock of `path` while inside.

    `timeout`: seconds to wait before raising CacheBusyError (a cache file: callers treat it as a miss).
    None waits as long as it takes (another process exporting or building the same thing), with one log line
    saying what it waits for and who holds it, repeated every WAIT_NOTICE_S. `purpose` is written into the
    lock file for whoever waits on it.
    """
    target = Path(path)
    lock = lock_path(target)
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if lock in held:
        raise RuntimeError(f"this thread already holds {lock}; file locks are not re-entrant")
    lock.parent.mkdir(parents=True, exist_ok=True)
    attempt = _Lock(lock, purpose)
    start = time.monotonic()
    next_notice = 0.0
    while not attempt.try_acquire():
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise CacheBusyError(
                f"{target} is locked by {lock_holder(target)} for more than {timeout:.0f} s; "
                "try again when it is done"
            )
        if waited >= next_notice:
            if next_notice == 0.0:
                logger.info("waiting for %s: held by %s", target, lock_holder(target))
            else:
                logger.info("still waiting for %s (%.0f s): held by %s", target, waited, lock_holder(target))
            next_notice = waited + WAIT_NOTICE_S
        time.sleep(_POLL_S)
    held.add(lock)
    try:
        yield
    finally:
        held.discard(lock)
        attempt.release()


def is_locked(path: str | Path) -> bool:
    """Whether another process (or thread) holds the lock of `path` right now."""
    lock = lock_path(path)
    if lock in _held.__dict__.get("paths", set()):
        return True
    if not lock.exists():
        return False
    attempt = _Lock(lock, "checking for leftovers")
    if attempt.try_acquire():
        attempt.release()
        return False
    return True


# ---- leftovers of killed processes ----------------------------------------------------------------------


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, child.lstat().st_mtime)
    return newest


def sweep_temps(folder: str | Path, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temp files and folders (`.<target>.<random>.tmp`) in `folder` that a killed write left:
    those untouched for `older_than` seconds whose target is not locked. Returns what was removed.

    Lock files a killed process left (`<name>.lock`, no longer held) go too."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None:
            stale_lock = (
                entry.name.endswith(".lock") and entry.is_file() and not is_locked(entry.with_suffix(""))
            )
            if stale_lock and not entry.exists():  # is_locked took and released it, which removed it
                removed.append(entry)
            continue
        try:
            if now - _newest_mtime(entry) < older_than or is_locked(folder / match["target"]):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as e:
            logger.debug("could not remove leftover %s: %s", entry, e)
            continue
        removed.append(entry)
        logger.info("removed %s, left by an interrupted write", entry)
    return removed


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


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object (a sidecar that
    cannot be trusted is as good as none)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
