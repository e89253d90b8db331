"""Where the app keeps what it makes: models, ONNX, engines, runtime and compile caches.

Layout under the cache root (see `cache_root`)::

    <root>/models/<tiny-model>/                       built-in random-weight models
    <root>/<model-key>/onnx/<stage>.onnx (+ data, manifest.json)
    <root>/<model-key>/engines/<platform-key>/<stage>.engine + <stage>.json
    <root>/<model-key>/runtime/<platform-key>.cache   ONE runtime / compile cache for all stages

Caches shipped with the app live in `caches/<model-key>/<platform-key>/runtime.cache`, listed in
`caches/manifest.json` (see caches/README.md).

Every write is atomic (temp file in the same folder, fsync, rename) and guarded by a file lock beside the
target (`<name>.lock`). Every read of a cache file validates magic, format version, platform key and
sha256; a bad file is a miss, said in one warning line, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import platformdirs

if TYPE_CHECKING:
    import torch

    from .loading import ModelSource

logger = logging.getLogger(__name__)

CACHE_ENV = "ADAPTIVE_DIFFUSION_CACHE_DIR"
SHIPPED_ENV = "ADAPTIVE_DIFFUSION_SHIPPED_CACHES"
LOCK_TIMEOUT = 60.0

BLOB_MAGIC = b"ADCACHE\x00"
BLOB_VERSION = 1
_BLOB_PREFIX = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER = 1 << 20

MANIFEST_VERSION = 1
SHIPPED_FILE = "runtime.cache"

# Sub-layout the app owns inside a model folder; `clear_cache` removes these and nothing else.
_MODEL_SUBDIRS = ("onnx", "engines", "runtime")
_MODEL_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*-[0-9a-f]{16}$")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else $ADAPTIVE_DIFFUSION_CACHE_DIR, else the user cache dir."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("adaptive-diffusion")
    return Path(cache_dir).expanduser()


def shipped_caches_dir() -> Path:
    """The prewarmed caches shipped with the app: $ADAPTIVE_DIFFUSION_SHIPPED_CACHES, else `caches/` beside
    the `pipeline` package (the repository root for a source checkout or an editable install)."""
    env = os.environ.get(SHIPPED_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "caches"


# ---- atomic writes and locks ------------------------------------------------------------------------------


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
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it (before any long work starts)."""
    from .errors import OutputError

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


# ---- platform and model keys -----------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver release (e.g. 560.35.03), from NVML where installed, else /proc on Linux."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, or no driver: fall back
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else None


def tool_versions(backend: str) -> dict[str, str]:
    """The versions whose change invalidates what `backend` compiled (absent tools are left out)."""
    import torch

    versions: dict[str, str | None] = {"python": ".".join(platform.python_version_tuple()[:2])}
    if backend == "rtx":
        versions["tensorrt_rtx"] = _dist_version("tensorrt_rtx")
    else:
        versions["torch"] = torch.__version__
        versions["triton"] = _dist_version("triton") or _dist_version("pytorch-triton")
    return {k: v for k, v in versions.items() if v}


@dataclass(frozen=True)
class PlatformInfo:
    """What a compiled artifact depends on: backend, device, driver, CUDA and tool versions."""

    backend: str
    device_type: str
    device_name: str
    compute_capability: str | None = None
    cpu_arch: str | None = None
    cpu_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Filesystem-safe, stable: the same platform gives the same key in every process."""
        parts = [self.backend, self.device_name]
        if self.compute_capability:
            parts.append("sm" + self.compute_capability.replace(".", ""))
        if self.cpu_arch:
            parts.append(self.cpu_arch)
        if self.cpu_capability:
            parts.append(self.cpu_capability)
        if self.driver_version:
            parts.append("drv" + self.driver_version)
        if self.cuda_version:
            parts.append("cuda" + self.cuda_version)
        parts += [f"{_TOOL_ABBREV.get(name, name)}{version}" for name, version in sorted(self.tools.items())]
        key = "-".join(_slug(p) for p in parts)
        if len(key) > 150:  # keep well under file name limits, still unique
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            key = f"{key[:137]}-{digest}"
        return key

    def fields(self) -> dict[str, Any]:
        """Human-readable fields, for manifests and --cache-info."""
        return {"key": self.key, **asdict(self)}


_TOOL_ABBREV = {"python": "py", "tensorrt_rtx": "trtrtx"}


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.]", "_", text.strip())).strip("_.").lower() or "none"


def platform_info(backend: str, device: torch.device | str) -> PlatformInfo:
    """Describe this machine for `backend` on `device` (a GPU by name and compute capability, or the CPU)."""
    import torch

    device = torch.device(device)
    tools = tool_versions(backend)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return PlatformInfo(
            backend=backend,
            device_type="cuda",
            device_name=torch.cuda.get_device_name(index),
            compute_capability=f"{major}.{minor}",
            driver_version=_driver_version(),
            cuda_version=torch.version.cuda,
            tools=tools,
        )
    if device.type == "cpu":
        return PlatformInfo(
            backend=backend,
            device_type="cpu",
            device_name="cpu",
            cpu_arch=platform.machine() or "unknown",
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            tools=tools,
        )
    return PlatformInfo(backend=backend, device_type=device.type, device_name=device.type, tools=tools)


def platform_key(backend: str, device: torch.device | str) -> str:
    """`platform_info(backend, device).key`."""
    return platform_info(backend, device).key


def model_key(source: ModelSource) -> str:
    """`<model id made filesystem-safe>-<content hash>`, e.g. `black-forest-labs--FLUX.1-dev-0123abcd...`."""
    model_id = source.model_id
    if "/" in model_id and (Path(model_id).is_absolute() or model_id.startswith((".", "~"))):
        model_id = Path(model_id).name  # a local folder: its name, not the whole path
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.replace("/", "--")).lstrip("._-")[:64] or "model"
    return f"{name}-{source.content_hash}"


@dataclass(frozen=True)
class ModelCache:
    """The paths of one model on one platform inside the cache root."""

    root: Path
    model_key: str
    platform_key: str

    @classmethod
    def for_model(
        cls,
        source: ModelSource,
        backend: str,
        device: torch.device | str,
        cache_dir: str | Path | None = None,
    ) -> ModelCache:
        return cls(cache_root(cache_dir), model_key(source), platform_key(backend, device))

    @property
    def model_dir(self) -> Path:
        return Path(self.root) / self.model_key

    @property
    def onnx_dir(self) -> Path:
        return self.model_dir / "onnx"

    @property
    def engine_dir(self) -> Path:
        return self.model_dir / "engines" / self.platform_key

    @property
    def runtime_cache_path(self) -> Path:
        """One runtime (rtx) or compile (torch) cache for all stages of the model on this platform."""
        return self.model_dir / "runtime" / f"{self.platform_key}.cache"


# ---- cache files: a small self-describing container -------------------------------------------------------
#
#   magic b"ADCACHE\0" | format version (u32 LE) | header length (u32 LE) | header (UTF-8 JSON) | payload
#
# The header holds platform_key, payload_size, sha256 (of the payload), created_at, tools, meta.


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


def load_blob(path: str | Path, platform_key: str, *, timeout: float = LOCK_TIMEOUT) -> bytes | None:
    """The payload of the cache file at `path` if it is whole and made for `platform_key`, else None.

    A missing file is a quiet miss. A bad, truncated, foreign or locked-too-long file is a miss with one
    warning line saying why; the next `save_blob` replaces it.
    """
    path = Path(path)
    if not path.is_file():
        logger.debug("no cache at %s", path)
        return None
    try:
        with file_lock(path, timeout):
            raw = path.read_bytes()
        _, payload = decode_blob(raw, platform_key)
    except (BadCacheFile, OSError, filelock.Timeout) as e:
        logger.warning("ignoring cache %s: %s; a fresh one will be saved", path, _reason(e))
        return None
    logger.debug("loaded cache %s (%d bytes)", path, len(payload))
    return payload


def blob_problem(path: str | Path, platform_key: str, *, timeout: float = LOCK_TIMEOUT) -> str | None:
    """Why the cache file at `path` cannot be used for `platform_key`, or None when it can."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with file_lock(path, timeout):
            raw = path.read_bytes()
        decode_blob(raw, platform_key)
    except (BadCacheFile, OSError, filelock.Timeout) as e:
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
        with file_lock(path, timeout):
            atomic_write_bytes(path, raw)
    except (OSError, filelock.Timeout) as e:
        logger.warning("could not save cache %s: %s", path, _reason(e))
        return False
    logger.debug("saved cache %s (%d bytes)", path, len(data))
    return True


def _reason(e: BaseException) -> str:
    if isinstance(e, filelock.Timeout):
        return "another process held its lock too long"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---- shipped caches ----------------------------------------------------------------------------------------


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


def update_manifest(shipped_dir: str | Path, entry: ShippedCache) -> None:
    """Add `entry` to the manifest, replacing any entry for the same model and platform (atomic, locked)."""
    path = Path(shipped_dir) / "manifest.json"
    with file_lock(path):
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
        problem = blob_problem(target, model_cache.platform_key)
        if problem is None:
            return target
        logger.warning("ignoring cache %s: %s", target, problem)
    shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_caches_dir()
    source = _matching_shipped(model_cache, shipped_dir)
    if source is None:
        return None
    try:
        data = source.read_bytes()
        with file_lock(target):
            atomic_write_bytes(target, data)
    except (OSError, filelock.Timeout) as e:
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
        path = shipped_dir / entry.folder / SHIPPED_FILE
        problem = _shipped_problem(entry, path, model_cache.platform_key)
        if problem:
            logger.warning("skipping shipped cache %s: %s", path, problem)
            continue
        return path
    return None


def _shipped_problem(entry: ShippedCache, path: Path, platform_key: str) -> str | None:
    expected = entry.files.get(SHIPPED_FILE, {}).get("sha256")
    if not path.is_file():
        return "listed in the manifest but missing"
    if not expected:
        return "the manifest has no sha256 for it"
    if sha256_file(path) != expected:
        return "sha256 differs from the manifest (damaged or edited)"
    try:
        decode_blob(path.read_bytes(), platform_key)
    except BadCacheFile as e:
        return str(e)
    return None


# ---- --cache-info and --clear-cache ---------------------------------------------------------------------


def current_platform_keys() -> list[str]:
    """Platform keys of this machine for each backend that can run here (torch always; rtx with a GPU)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = [platform_key("torch", device)]
    if device.type == "cuda":
        keys.insert(0, platform_key("rtx", device))
    return keys


def cache_info(
    root: str | Path,
    *,
    shipped_dir: str | Path | None = None,
    platform_keys: list[str] | None = None,
) -> str:
    """A report of what is cached where: models, ONNX, engines, runtime caches (sizes, platform keys), and
    which shipped caches match this machine's platform."""
    root = Path(root)
    shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_caches_dir()
    current = platform_keys if platform_keys is not None else current_platform_keys()
    lines = [f"cache folder: {root}" + ("" if root.is_dir() else " (empty)")]
    lines += [f"this platform: {key}" for key in current]
    models = root / "models"
    if models.is_dir():
        for folder in sorted(p for p in models.iterdir() if p.is_dir()):
            lines.append(f"  model {folder.name}: {_size(_tree_size(folder))}  {folder}")
    for model_dir in _model_dirs(root):
        lines.append(f"  {model_dir.name}/  {_size(_tree_size(model_dir))}")
        onnx = model_dir / "onnx"
        if onnx.is_dir():
            n = sum(1 for p in onnx.glob("*.onnx"))
            lines.append(f"    onnx: {n} stage(s), {_size(_tree_size(onnx))}")
        engines = model_dir / "engines"
        if engines.is_dir():
            for folder in sorted(p for p in engines.iterdir() if p.is_dir()):
                n = sum(1 for p in folder.glob("*.engine"))
                lines.append(f"    engines [{folder.name}]: {n} engine(s), {_size(_tree_size(folder))}")
        runtime = model_dir / "runtime"
        if runtime.is_dir():
            for file in sorted(runtime.glob("*.cache")):
                lines.append(f"    runtime cache [{file.stem}]: {_describe_blob(file, file.stem)}")
    lines.append(f"shipped caches: {shipped_dir}")
    try:
        entries = read_manifest(shipped_dir)
    except BadCacheFile as e:
        lines.append(f"  unreadable: {e}")
        entries = []
    if not entries:
        lines.append("  none")
    for entry in entries:
        path = shipped_dir / entry.folder / SHIPPED_FILE
        size = entry.files.get(SHIPPED_FILE, {}).get("size", 0)
        shapes = ", ".join(f"{s.get('batch', 1)}x{s['height']}x{s['width']}" for s in entry.shapes)
        mark = "MATCHES this platform" if entry.platform_key in current else "other platform"
        state = "" if path.is_file() else " (file missing)"
        lines.append(
            f"  {entry.folder}: {entry.precision}, shapes {shapes or '-'}, {_size(size)}, {mark}{state}"
        )
    return "\n".join(lines)


def _describe_blob(path: Path, platform_key: str) -> str:
    size = _size(path.stat().st_size)
    try:
        header = read_blob_header(path)
    except (BadCacheFile, OSError) as e:
        return f"{size}, unusable ({_reason(e)})"
    if header.platform_key != platform_key:
        return f"{size}, unusable (made for platform {header.platform_key})"
    return f"{size}, created {header.created_at}"


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _MODEL_KEY_RE.match(p.name))


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def clear_cache(root: str | Path) -> list[Path]:
    """Remove what the app made under `root` and return the removed paths.

    Removed: `<model-key>/{onnx,engines,runtime}/` and the built-in tiny models in `models/`; folders left
    empty by that. Anything else (a file a user put there, an unknown folder) is kept.
    """
    from .loading import TINY_MODELS

    root = Path(root)
    removed: list[Path] = []
    for model_dir in _model_dirs(root):
        for name in _MODEL_SUBDIRS:
            _remove(model_dir / name, removed)
        _remove_if_empty(model_dir, removed)
    models = root / "models"
    for name in TINY_MODELS:
        _remove(models / name, removed)
        for tmp in models.glob(f".{name}.*"):  # half-made by an interrupted make_tiny_model
            _remove(tmp, removed)
    _remove_if_empty(models, removed)
    return removed


def _remove(path: Path, removed: list[Path]) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return
    removed.append(path)


def _remove_if_empty(path: Path, removed: list[Path]) -> None:
    try:
        path.rmdir()
    except OSError:  # missing, or holds something the app did not make
        return
    removed.append(path)
