"""The background compiler's worker process: `python -m pipeline.engines.background_worker BATCH` compiles
the jobs a serving process wrote (background_compile.py says how the two sides meet)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .background_compile import CLOSED, Batch, Landed, landed_file_name, materialize

logger = logging.getLogger(__name__)

NICE = 10  # the worker's CPU priority below the serving process
SAVE_EVERY_S = 15.0  # the worker merges into the cache file at most this often (a kill loses that much)


def _owner_gone(batch: Batch) -> bool:
    if (Path(batch.spool) / CLOSED).exists():
        return True
    try:
        os.kill(batch.owner_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def compile_batch(batch: Batch) -> int:
    """Compile every job of `batch`; returns how many failed."""
    from ..cache import atomic_write_bytes
    from .compile_cache import ArtifactStore, save_store
    from .region_artifacts import put_native, read_native
    from .torch_compile import aot_compile_region, configure_dynamo

    configure_dynamo()
    device = torch.device(batch.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    failed, store, saved_at = 0, ArtifactStore(), time.monotonic()
    cache_path = Path(batch.cache_path)
    for job in batch.jobs:
        try:
            block = job.block.to_empty(device=device)
            block._class_forward = type(block).forward
            with torch.inference_mode():
                args, kwargs = materialize(job.args, device), materialize(job.kwargs, device)
                _, data, native = aot_compile_region(
                    block, args, kwargs, dynamic=batch.dynamic, options=batch.options
                )
        except Exception:
            logger.exception("compiling %s failed", job.group)
            failed += 1
            continue
        landed = Landed(job.group, data, read_native(native))
        store.add(job.group, data)
        put_native(store, landed.native)
        if time.monotonic() - saved_at >= SAVE_EVERY_S:  # each save rewrites the file: not after every job
            save_store(store, cache_path, batch.platform_key, batch.meta)
            saved_at = time.monotonic()
        buffer = io.BytesIO()
        torch.save(landed, buffer)
        try:
            atomic_write_bytes(Path(batch.spool) / landed_file_name(job.key), buffer.getvalue())
        except OSError:  # the serving process is gone and so is its spool: the cache file has it
            pass
        logger.info("compiled %s", job.group)
    save_store(store, cache_path, batch.platform_key, batch.meta)
    return failed


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if hasattr(os, "nice"):
        os.nice(NICE)  # below the serving process
    path = Path(args[0])
    batch: Batch = torch.load(path, weights_only=False)  # our own file, in a folder only we can read
    path.unlink(missing_ok=True)  # loaded: a batch file left in the spool is a worker still starting
    failed = compile_batch(batch)
    if _owner_gone(batch) and not any(Path(batch.spool).glob("batch-*.pt")):
        shutil.rmtree(batch.spool, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
