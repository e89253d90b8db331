"""Where the app keeps what it makes: models, ONNX, engines, runtime and compile caches.

One room per responsibility:

- files.py     atomic writes (temp file, fsync, rename) and inter-process locks
- platform.py  platform keys: what compiled code depends on
- store.py     the cache folder of one model on one platform (`ModelCache`, `cache_root`, `model_key`)
- blob.py      the cache-file container (magic, version, platform key, sha256), loaded and saved safely
- shipped.py   prewarmed caches shipped with the app (`caches/manifest.json`) and choosing the one to start from
- report.py    `--cache-info` and `--clear-cache`

Every write is atomic and guarded by a file lock beside the target (`<name>.lock`, removed on release; a
process that waits for one says what it waits for and who holds it). Temp files that killed processes left
are swept once stale and unlocked (`sweep_temps`). Every read of a cache file
validates magic, format version, platform key and sha256; a bad file is a miss, said in one warning line, never
an exception.
"""

from __future__ import annotations

from .blob import (
    BLOB_MAGIC,
    BLOB_VERSION,
    BadCacheFile,
    BlobHeader,
    blob_problem,
    decode_blob,
    encode_blob,
    load_blob,
    read_blob_header,
    save_blob,
)
from .files import (
    LOCK_TIMEOUT,
    STALE_AFTER_S,
    atomic_write_bytes,
    atomic_write_text,
    ensure_writable_dir,
    file_lock,
    hash_sidecar,
    is_locked,
    lock_holder,
    lock_path,
    read_json_object,
    remembered_sha256,
    sha256_file,
    sweep_temps,
)
from .platform import PlatformInfo, driver_problem, platform_info, platform_key, tool_versions
from .report import cache_info, clear_cache, current_platform_keys
from .shipped import (
    MANIFEST_VERSION,
    SHIPPED_ENV,
    SHIPPED_FILE,
    ShippedCache,
    read_manifest,
    resolve_runtime_cache,
    shipped_caches_dir,
    update_manifest,
)
from .store import CACHE_ENV, ModelCache, cache_root, model_key

__all__ = [
    "BLOB_MAGIC",
    "BLOB_VERSION",
    "CACHE_ENV",
    "LOCK_TIMEOUT",
    "MANIFEST_VERSION",
    "SHIPPED_ENV",
    "SHIPPED_FILE",
    "STALE_AFTER_S",
    "BadCacheFile",
    "BlobHeader",
    "ModelCache",
    "PlatformInfo",
    "ShippedCache",
    "atomic_write_bytes",
    "atomic_write_text",
    "blob_problem",
    "cache_info",
    "cache_root",
    "clear_cache",
    "current_platform_keys",
    "decode_blob",
    "driver_problem",
    "encode_blob",
    "ensure_writable_dir",
    "file_lock",
    "hash_sidecar",
    "is_locked",
    "load_blob",
    "lock_holder",
    "lock_path",
    "model_key",
    "platform_info",
    "platform_key",
    "read_blob_header",
    "read_json_object",
    "read_manifest",
    "remembered_sha256",
    "resolve_runtime_cache",
    "save_blob",
    "sha256_file",
    "shipped_caches_dir",
    "sweep_temps",
    "tool_versions",
    "update_manifest",
]
