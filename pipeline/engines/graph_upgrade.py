"""Work a serving thread hands to a thread of its own, with another attention kernel, and takes back later.

The torch backend captures a new size's CUDA graph with flash attention (attention.py: no per-shape plans, so
the call that meets the size is not held up by them) and submits a job that captures the same step again with
cuDNN's attention, the faster kernel once its plans exist. The job runs here, in one long-lived thread: cuDNN
keeps its plans per thread, so they accumulate in that thread, and a captured graph replays from any thread.
Between calls the backend `take`s what finished and serves it from then on.

A result is only taken for the generation it was submitted in: the backend bumps the generation when what the
graphs ran changes (regions swapped in from the background compiler), so a stale graph is never served. A job
that fails is said once in the log; the graph it would have replaced stays in service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from .attention import use_backend

logger = logging.getLogger(__name__)


class GraphUpgrader:
    """One background thread that runs `job()`s under attention `backend` and keeps their results by key."""

    def __init__(self, backend: str | None = None, name: str = "graph-upgrade") -> None:
        self.backend = backend  # None: the process-wide attention flags (cuDNN where chosen)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._ready: dict[Hashable, Any] = {}
        self._futures: dict[Hashable, Future[None]] = {}
        self.generation = 0
        self.done = 0  # results taken
        self.failed = 0
        self.seconds: dict[str, float] = {}  # str(key) -> seconds the job took

    def wanted(self, generation: int) -> bool:
        """Whether a job of `generation` is still wanted (checked by jobs before their last step)."""
        return generation == self.generation

    def submit(self, key: Hashable, job: Callable[[Callable[[], bool]], Any]) -> None:
        """Run `job(still_wanted)` in the thread; a result that is not None is kept for `take`."""
        generation = self.generation

        def run() -> None:
            if not self.wanted(generation):
                return
            start = time.perf_counter()
            with use_backend(self.backend), torch.inference_mode():
                result = job(lambda: self.wanted(generation))
            self.seconds[str(key)] = round(time.perf_counter() - start, 3)
            with self._lock:
                if result is not None and self.wanted(generation):
                    self._ready[key] = result

        future = self._executor.submit(run)
        future.add_done_callback(lambda f: self._finished(key, f))
        self._futures[key] = future

    def _finished(self, key: Hashable, future: Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            self.failed += 1
            logger.warning("background graph capture for %s failed (%s); its first graph stays", key, error)

    def take(self) -> dict[Hashable, Any]:
        """What finished since the last take, by key."""
        with self._lock:
            ready, self._ready = self._ready, {}
        self.done += len(ready)
        return ready

    def invalidate(self) -> None:
        """Results of jobs submitted so far are no longer wanted (those running skip their capture)."""
        with self._lock:
            self.generation += 1
            self._ready.clear()

    @property
    def busy(self) -> bool:
        return any(not f.done() for f in self._futures.values())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the submitted jobs; returns whether all are done."""
        _, pending = wait_futures(list(self._futures.values()), timeout=timeout)
        return not pending

    def close(self) -> None:
        """Drop queued jobs, wait for the running one, end the thread."""
        self.invalidate()
        self._executor.shutdown(wait=True, cancel_futures=True)
