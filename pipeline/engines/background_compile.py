"""Regions compiled in another process while this one serves them eagerly (`compile_resnets="background"`).

SD 1.5's resnets make a call 0.521 -> 0.451 s compiled (H200, 512², 50 steps, 2026-12-03), but they are 15
artifacts, one per block shape: compiled in the first call they make it 87 s instead of 11.5 s, a wait no first
request should have. So a region kind deferred to the background runs eagerly while its artifacts are missing,
and each missing one becomes a job:

1. `submit` (inside a call, host-side only: it may run during a CUDA-graph capture) records the block as a
   meta-device copy (structure, parameter shapes, strides and dtypes; no weights) and its inputs' shapes.
2. `launch`, after the call, writes the jobs to a file and starts one worker process
   (`python -m pipeline.engines.background_worker JOBS`), which lowers its own CPU priority.
3. The worker compiles each job with the same code as in-process compiles (torch_compile.aot_compile_region),
   on empty tensors of the recorded layouts on the same device, and for each artifact: drops it in the spool
   folder for this process and merges it into the model's compile cache file (locked, atomic; at most every
   background_worker.SAVE_EVERY_S and at the end: a killed worker loses only its last seconds of work, and
   the next process starts with everything that landed).
4. When the worker exits, a thread of this process loads its artifacts and runs each once on zero inputs, on
   a CUDA stream of its own: the first run of loaded code has one-time costs (SD 1.5's 15 resnet artifacts:
   a 5.6 s capture when they were first run inside a call), paid there while calls go on eagerly.
5. `take`, between calls, hands over what that thread made ready, all at once (the backend recaptures its
   CUDA graphs once per batch, not once per artifact).

A worker that fails is said in one line with the tail of its log; its kinds stay eager (today's speed).
Closing the pipeline leaves a running worker to finish (it writes only the cache file, under its lock): a
one-image CLI run still leaves the next process its compiled regions. The worker removes the spool folder.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

logger = logging.getLogger(__name__)

LOG_TAIL = 600  # characters of a failed worker's log in the warning
WORKER_MODULE = "pipeline.engines.background_worker"  # what a worker process runs (python -m)


@dataclass(frozen=True)
class TensorSpec:
    """What compiled code depends on of an input tensor (its values are not needed to compile)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device).zero_()


def describe(value: Any) -> Any:
    """`value` (tensors in tuples, lists, dicts) with each tensor replaced by its TensorSpec."""
    return tree_map_only(
        torch.Tensor, lambda t: TensorSpec(tuple(t.shape), tuple(t.stride()), t.dtype), value
    )


def materialize(value: Any, device: torch.device) -> Any:
    """`describe`'s inverse, with zero-filled tensors of those layouts on `device`."""
    return tree_map_only(TensorSpec, lambda spec: spec.empty(device), value)


def meta_copy(block: nn.Module) -> nn.Module:
    """A copy of `block` with every parameter and buffer on the meta device (same shape, strides, dtype) and
    without the compile hooks (instance `forward` / `_class_forward`) of it or its submodules."""
    memo: dict[int, Any] = {}
    for tensor in (*block.parameters(), *block.buffers()):
        meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        is_param = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if is_param else meta
    clone = copy.deepcopy(block, memo)
    for module in clone.modules():
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_class_forward", None)
    return clone


@dataclass
class Job:
    key: str  # the group and the input layouts: one job per shape a region meets
    group: str
    kind: str
    block: nn.Module  # meta_copy
    args: Any  # describe()d
    kwargs: Any


@dataclass
class Batch:
    """What one worker compiles: its jobs and everything it needs to compile them like this process would."""

    jobs: list[Job]
    device: str
    dynamic: bool
    options: dict[str, Any]
    spool: str  # where finished artifacts are dropped for the serving process
    cache_path: str  # the model's compile cache file
    platform_key: str
    meta: dict[str, Any]  # what the serving process writes into the cache file's metadata
    owner_pid: int  # the serving process: once it is gone (or closed), the last worker removes the spool


@dataclass
class Landed:
    group: str
    data: bytes
    native: dict[str, bytes] = field(default_factory=dict)  # CPU kernel libraries: path -> bytes


@dataclass
class Ready(Landed):
    """A landed artifact loaded in this process and run once: what the region compiler swaps in."""

    fn: Any = None


class BackgroundCompiler:
    """The serving process's side: records jobs, runs one worker at a time, hands over what landed."""

    def __init__(
        self,
        *,
        device: torch.device,
        dynamic: bool,
        options: dict[str, Any],
        cache_path: Path,
        platform_key: str,
        meta: dict[str, Any],
    ) -> None:
        self.device, self.dynamic, self.options = device, dynamic, dict(options)
        self.cache_path, self.platform_key, self.meta = cache_path, platform_key, meta
        self.spool = Path(tempfile.mkdtemp(prefix="adaptive-regions-"))
        self.queued: list[Job] = []
        # job keys submitted once (a group meets several sizes: one job each), and those that failed (eager
        # for good in this process)
        self.submitted: set[str] = set()
        self.failed: set[str] = set()
        self._blocks: dict[str, nn.Module] = {}  # job key -> a live block of it (for the warm-up run)
        self._proc: subprocess.Popen[bytes] | None = None
        self._running: list[Job] = []
        self._preparing: threading.Thread | None = None
        self._ready: list[Ready] = []
        self._batches = 0

    # ---- inside a call ----------------------------------------------------------------------------------------
    def submit(self, group: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record a job for a region call that no artifact serves (host-side work only)."""
        layouts = (describe(args), describe(kwargs))
        key = f"{group}-{hashlib.sha256(repr(layouts).encode()).hexdigest()[:12]}"
        if key in self.submitted or key in self.failed:
            return
        self.submitted.add(key)
        self._blocks[key] = block
        self.queued.append(Job(key, group, type(block).__name__, meta_copy(block), *layouts))

    # ---- between calls ----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.queued or self._running or self._preparing or self._ready)

    def launch(self) -> None:
        """Start a worker on the queued jobs, unless one is running (it takes the next batch when done)."""
        if self._proc is not None or not self.queued:
            return
        jobs, self.queued = self.queued, []
        self._proc = self._start(jobs)
        self._running = jobs
        logger.info(
            "compiling %d region(s) in the background (%s); they run eagerly until then",
            len(jobs),
            ", ".join(sorted({job.kind for job in jobs})),
        )

    def _start(self, jobs: list[Job]) -> subprocess.Popen[bytes]:
        self._batches += 1
        batch = Batch(
            jobs,
            str(self.device),
            self.dynamic,
            self.options,
            str(self.spool),
            str(self.cache_path),
            self.platform_key,
            self.meta,
            os.getpid(),
        )
        path = self.spool / f"batch-{self._batches}.pt"
        torch.save(batch, path)
        with open(self.spool / f"batch-{self._batches}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def take(self) -> list[Ready]:
        """Artifacts ready to serve (loaded and run once), else []. A finished worker's artifacts are loaded
        and run once on zero inputs in a thread, on a stream of its own, while calls go on: the first run of
        loaded code (kernel loading, Triton's launch set-up) is paid there, not in the call that swaps them
        in. Starts the next batch's worker."""
        if self._preparing is not None and not self._preparing.is_alive():
            self._preparing = None
        if self._preparing is None and self._proc is not None and self._proc.poll() is not None:
            self._collect()
            self.launch()
        if self._preparing is None and self._ready:
            ready, self._ready = self._ready, []
            return ready
        return []

    def _collect(self) -> None:
        assert self._proc is not None
        code, self._proc = self._proc.returncode, None
        landed = [self._read(job) for job in self._running]
        missing = [job for job, item in zip(self._running, landed, strict=True) if item is None]
        if missing:
            self.failed.update(job.key for job in missing)
            logger.warning(
                "background compile of %d region(s) failed (exit %s); they stay eager: %s",
                len(missing),
                code,
                self._log_tail(),
            )
        pairs = [(job, item) for job, item in zip(self._running, landed, strict=True) if item is not None]
        self._running = []
        if pairs:
            self._preparing = threading.Thread(
                target=self._prepare, args=(pairs,), name="region-warmup", daemon=True
            )
            self._preparing.start()

    def _prepare(self, pairs: list[tuple[Job, Landed]]) -> None:
        from .region_artifacts import deserialize
        from .torch_compile import _short

        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for job, landed in pairs:
            block = self._blocks.pop(job.key, None)
            try:
                fn = deserialize(landed.data)
                if block is not None:
                    with torch.inference_mode(), torch.cuda.stream(stream) if stream else nullcontext():
                        fn(block, *materialize(job.args, self.device), **materialize(job.kwargs, self.device))
                    if stream is not None:
                        stream.synchronize()
            except Exception as e:  # a damaged artifact: its region stays eager
                logger.warning("background-compiled %s could not be loaded: %s", job.kind, _short(e))
                self.failed.add(job.key)
                continue
            self._ready.append(Ready(landed.group, landed.data, landed.native, fn))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running worker exits, or the loading thread ends (or `timeout` seconds);
        whether neither runs now."""
        try:
            if self._proc is not None:
                self._proc.wait(timeout)
            elif self._preparing is not None:
                self._preparing.join(timeout)
                return not self._preparing.is_alive()
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self, *, stop: bool = False) -> int:
        """Detach: a running worker finishes into the cache file and queued jobs get one of their own (the
        next process loads what they compile); `stop` kills them instead (what already landed in the cache
        file stays). Returns how many regions were left compiling."""
        running = [self._proc] if self._proc is not None and self._proc.poll() is None else []
        left = len(self._running) if running else 0
        if self.queued and not stop:
            running.append(self._start(self.queued))
            left += len(self.queued)
        self.queued, self._running, self._proc = [], [], None
        if stop:
            for proc in running:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            running, left = [], 0
        if running:
            (self.spool / CLOSED).touch()  # the workers remove the spool when they are done
            logger.info(
                "%d region(s) still compiling in the background (pid %s); they land in the compile cache "
                "for the next process",
                left,
                ", ".join(str(p.pid) for p in running),
            )
        else:
            shutil.rmtree(self.spool, ignore_errors=True)
        return left

    def _read(self, job: Job) -> Landed | None:
        path = self.spool / landed_file_name(job.key)
        try:
            return torch.load(path, weights_only=False)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):  # missing or cut short
            return None

    def _log_tail(self) -> str:
        path = self.spool / f"batch-{self._batches}.log"
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            return "no log"
        return " | ".join(text[-LOG_TAIL:].splitlines()[-6:]) or "empty log"


CLOSED = "closed"  # in the spool: the serving process closed with workers still running


def landed_file_name(key: str) -> str:
    return f"{key}.landed"
