"""Compiled regions as bytes, and the CPU kernel libraries kept beside them.

`serialize` / `deserialize` wrap torch's precompile API (`save_compiled_function` /
`torch.compiler.load_compiled_function`) for artifacts held in memory rather than in files. On the CPU,
torch's artifact holds Inductor's kernels as C++ source that is compiled again at load (a minute on a small
CPU), so the compiled libraries are stored too (`native/<path>` entries of the compile cache) and put back
under Inductor's cache folder before an artifact loads.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .compile_cache import NATIVE_GROUP, ArtifactStore

logger = logging.getLogger(__name__)


def serialize(fn: Any) -> bytes:
    fd, path = tempfile.mkstemp(suffix=".aot")
    os.close(fd)
    try:
        fn.save_compiled_function(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def deserialize(data: bytes) -> Any:
    # Guards are rebuilt here, relative to the thread's dispatch state: build them in the state calls run in
    # (engines always run under inference mode), or no tensor ever matches.
    with torch.inference_mode():
        return torch.compiler.load_compiled_function(io.BytesIO(data))


# ---- CPU kernels: the compiled libraries beside the artifacts ----------------------------------------------
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


def inductor_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def native_files() -> set[str]:
    """Compiled kernel libraries in Inductor's cache folder, as paths relative to it."""
    root = inductor_dir()
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in NATIVE_SUFFIXES and p.is_file()
    }


def read_native(paths: set[str]) -> dict[str, bytes]:
    """The kernel libraries at `paths` (relative to Inductor's cache folder), by path."""
    root, libs = inductor_dir(), {}
    for rel in sorted(paths):
        try:
            libs[rel] = (root / rel).read_bytes()
        except OSError:  # removed meanwhile: the kernel is compiled again at load
            continue
    return libs


def put_native(store: ArtifactStore, libs: dict[str, bytes]) -> None:
    """Keep kernel libraries (`read_native`'s) in `store`, beside the artifacts that need them."""
    for rel, lib in libs.items():
        store.put(f"{NATIVE_GROUP}/{rel}", NATIVE_GROUP, lib)


def restore_native(store: ArtifactStore) -> int:
    """Put the stored kernel libraries back where Inductor looks for them (never outside its folder)."""
    from ..cache import atomic_write_bytes

    root, count = inductor_dir(), 0
    for key in store.keys(NATIVE_GROUP):
        rel = PurePosixPath(key.split("/", 1)[1])
        if rel.is_absolute() or ".." in rel.parts or rel.suffix not in NATIVE_SUFFIXES:
            store.discard(key)
            continue
        target = root.joinpath(*rel.parts)
        if not target.is_file():
            try:
                atomic_write_bytes(target, store.get(key))
                count += 1
            except OSError as e:
                logger.debug("could not restore %s: %s", target, e)
    return count
