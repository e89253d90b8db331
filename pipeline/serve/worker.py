"""One worker thread per model: a bounded queue, same-shape batching into one pipeline call, timeouts.

Requests arrive as `Job`s (already validated; `jobs.py` defines them and the errors that end them). The
worker takes the oldest waiting job and every other waiting job with the same `BatchKey` (size, steps,
guidance, scheduler, LoRA), up to `max_batch` images, and makes ONE pipeline call for all of them: a list of
prompts, a list of negative prompts and one `torch.Generator` per image, as diffusers takes them. Image i of a
request with seed s is drawn from `Generator().manual_seed(s + i)`, so it is the image a request of its own
with seed s + i gets.

Every accepted job ends: with its images, or an error (timeout, cancelled, the pipeline's own error, the server
stopping). A job whose client went away is removed from the queue; in a running batch its images are dropped,
and a batch whose every job went away is abandoned at the next step.

Before the first request the worker serves the `--warm-size` sizes once (Pipeline.warm_up, in this thread:
cuDNN keeps its plans per thread). It counts the shapes it serves (sizes.py), and after a restart warms the
most served of them while no request waits.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from ..errors import InvalidInputError, PipelineError
from .jobs import BatchKey, BatchResult, Job, JobState, JobTimeoutError, QueueFullError, ServiceStoppedError
from .sizes import ServedSizes, Shape

logger = logging.getLogger("pipeline.serve")

RECENT_JOBS = 1024  # finished jobs kept for /v1/progress


class _Abandoned(Exception):
    """Raised from the step callback when no job of the running batch wants its images any more."""


class StepProgress:
    """Steps done by the running batch, read from another thread.

    The pipeline's step callback runs when a step has been queued; on CUDA the GPU may be behind. Each step
    records a CUDA event (no host sync), and `done()` counts the events the GPU has reached.
    """

    def __init__(self, device: torch.device, should_stop: Any) -> None:
        self.total = 0
        self._queued = 0
        self._events: list[torch.cuda.Event] | None = [] if device.type == "cuda" else None
        self._should_stop = should_stop

    def on_step(self, pipe: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.total = pipe.num_timesteps
        if self._events is not None:
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)
        self._queued = index + 1
        if self._should_stop():
            raise _Abandoned
        return kwargs

    def done(self) -> int:
        if self._events is None:
            return self._queued
        return sum(1 for event in list(self._events) if event.query())


class Worker:
    """The one thread that calls the pipeline, and the queue in front of it."""

    def __init__(
        self,
        pipe: Any,
        *,
        max_queue: int,
        max_batch: int,
        batch_wait: float,
        scheduler: str | None,
        lora_names: tuple[str, ...] = (),
        warm_sizes: tuple[tuple[int, int], ...] = (),
        warm_recent: tuple[Shape, ...] = (),
        served: ServedSizes | None = None,
    ) -> None:
        self.pipe = pipe
        self.warm_sizes = warm_sizes
        self.warming = bool(warm_sizes)  # until the worker thread has served them (requests queue meanwhile)
        self._warm_recent = list(warm_recent)  # shapes served before a restart (sizes.py), warmed while idle
        self.served = served if served is not None else ServedSizes(None)
        self.warm_up_s: dict[str, float] = {}
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.lora_names = lora_names
        self._scheduler = scheduler  # what the pipeline is set to now
        self._lora: tuple[tuple[str, float], ...] = ()
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._progress: StepProgress | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._stopping = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="pipeline-worker", daemon=True)

    # ---- the request side (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFullError / ServiceStoppedError / InvalidInputError (id in use)."""
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise ServiceStoppedError("the server is stopping; retry on another replica or later")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later",
                    self._retry_after_locked(),
                )
            known = self._jobs.get(job.request_id)
            if known is not None and not known.finished:
                raise InvalidInputError(f"request_id {job.request_id!r} is already in use")
            self._jobs[job.request_id] = job
            self._jobs.move_to_end(job.request_id)
            self._forget_old_locked()
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, error: BaseException | None = None) -> None:
        """The client is gone (error None) or out of time: drop the job from the queue, or its images."""
        with self._cond:
            if job.finished:
                return
            if job.state is JobState.QUEUED:
                self._pending.remove(job)
            self._end_locked(job, JobState.CANCELLED, error)
            self._cond.notify_all()

    def find(self, request_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(request_id)

    def progress(self, job: Job) -> dict[str, Any]:
        """What the web page and /v1/progress show: state, steps done of how many, place in the queue."""
        with self._cond:
            snap: dict[str, Any] = {"request_id": job.request_id, "state": str(job.state)}
            if job.state is JobState.QUEUED:
                snap |= {"queue_position": self._pending.index(job), "step": 0, "steps": job.key.steps}
            elif job.state is JobState.RUNNING and self._progress is not None:
                total = self._progress.total or job.key.steps
                snap |= {"step": self._progress.done(), "steps": total, "batch_id": job.batch_id}
            return snap

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queued": len(self._pending),
                "running": sum(j.n for j in self._running),
                "batches": self.batches,
                "images": self.images,
                "max_queue": self.max_queue,
                "max_batch": self.max_batch,
                "warming": self.warming,
                "warming_recent": len(self._warm_recent),
                "warm_up_s": dict(self.warm_up_s),
            }

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new jobs, fail the waiting ones, let the running batch finish (up to `timeout`).
        Returns whether the worker thread has ended (then nothing else is using the pipeline)."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending):
                self._end_locked(job, JobState.FAILED, ServiceStoppedError("the server stopped"))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._warm_up()
            while True:
                self._warm_recent_while_idle()
                if (batch := self._next_batch()) is None:
                    break
                self._run_batch(batch)
        finally:  # whatever ends the thread, no accepted job is left waiting
            self.served.flush()
            with self._cond:
                self._stopping = True
                for job in self._pending + self._running:
                    self._end_locked(job, JobState.FAILED, ServiceStoppedError("the server's worker stopped"))
                self._pending.clear()

    def _warm_up(self) -> None:
        """Serve `warm_sizes` once, in this thread (cuDNN keeps its plans per thread). A failure is a warning:
        the server then serves those sizes as it would have without it."""
        try:
            if self.warm_sizes:
                self.warm_up_s = self.pipe.warm_up(list(self.warm_sizes))
        except Exception as e:
            logger.warning("warm-up failed (%s: %s); serving without it", type(e).__name__, e)
        finally:
            with self._cond:
                self.warming = False

    def _warm_recent_while_idle(self) -> None:
        """Warm the shapes served before the restart, one per call, while no request waits (a failure is a
        warning, and the rest are dropped: they would likely fail alike)."""
        while self._warm_recent:
            with self._cond:
                if self._pending or self._stopping:
                    return
                shape = self._warm_recent[0]
            failed = False
            try:
                spent = self.pipe.warm_up([(shape.width, shape.height)], num_images_per_prompt=shape.images)
            except Exception as e:
                logger.warning(
                    "warm-up of %s failed (%s: %s); not warming the rest", shape, type(e).__name__, e
                )
                spent, failed = {}, True
            with self._cond:
                self.warm_up_s |= spent
                del self._warm_recent[: len(self._warm_recent) if failed else 1]

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._expire_locked()
                if self._pending:
                    break
                self._cond.wait(timeout=self._next_deadline_locked())
            # a moment for same-shape company, unless the batch is already full
            until = time.monotonic() + self.batch_wait
            while (wait := until - time.monotonic()) > 0 and self._fill_locked() < self.max_batch:
                self._cond.wait(wait)
                if self._stopping or not self._pending:
                    return [] if not self._stopping else None
            head = self._pending[0]
            batch, images = [], 0
            for job in self._pending:
                if job.key == head.key and images + job.n <= self.max_batch:
                    batch.append(job)
                    images += job.n
            self.batches += 1
            for job in batch:
                self._pending.remove(job)
                job.state, job.batch_id = JobState.RUNNING, self.batches
            self._running = batch
            self._progress = StepProgress(self.pipe.device, lambda: self._should_stop(batch))
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        if not batch:
            return
        key, progress, batch_id = batch[0].key, self._progress, batch[0].batch_id
        assert progress is not None and batch_id is not None
        prompts = [job.prompt for job in batch for _ in job.seeds]
        negatives = [job.negative_prompt or "" for job in batch for _ in job.seeds]
        use_negatives = any(job.negative_prompt for job in batch)  # SD reads None as "", FLUX has none
        generators = [torch.Generator("cpu").manual_seed(seed) for job in batch for seed in job.seeds]
        start = time.perf_counter()
        try:
            self._switch_to(key)
            out = self.pipe(
                prompts,
                height=key.height,
                width=key.width,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance_scale,
                negative_prompt=negatives if use_negatives else None,
                generator=generators,
                callback_on_step_end=progress.on_step,
            )
        except _Abandoned:
            logger.info(
                "batch %d abandoned: none of its %d request(s) is waiting any more", batch_id, len(batch)
            )
            self._finish(batch, None, start)
        except BaseException as e:
            if not isinstance(e, PipelineError):
                logger.exception("batch %d failed", batch_id)
            self._finish(batch, e, start)
            if not isinstance(e, Exception):
                raise
        else:
            seconds = time.perf_counter() - start
            settings = dict(out.settings, scheduler=key.scheduler, lora=dict(key.lora))
            results, i = [], 0
            for job in batch:
                results.append(
                    BatchResult(out.images[i : i + job.n], settings, batch_id, len(prompts), seconds)
                )
                i += job.n
            self._finish(batch, results, start)
            self.served.record(Shape(key.width, key.height, len(prompts)))

    def _finish(
        self, batch: list[Job], outcome: list[BatchResult] | BaseException | None, start: float
    ) -> None:
        seconds = time.perf_counter() - start
        with self._cond:
            for i, job in enumerate(batch):
                if isinstance(outcome, list):
                    if not job.finished:
                        job.future.set_result(outcome[i])
                        job.state = JobState.DONE
                        self.images += job.n
                else:
                    self._end_locked(job, JobState.FAILED, outcome)
            self._running, self._progress = [], None
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            self._cond.notify_all()

    def _switch_to(self, key: BatchKey) -> None:
        """Set the pipeline's scheduler and LoRA scales to the batch's, where they differ."""
        if key.scheduler is not None and key.scheduler != self._scheduler:
            logger.info("switching scheduler %s -> %s", self._scheduler, key.scheduler)
            self.pipe.scheduler = key.scheduler
            self._scheduler = key.scheduler
        if key.lora != self._lora:
            # every loaded adapter stays set, unused ones at scale 0: a scale change, never a reload
            scales = dict(key.lora)
            weights = [scales.get(name, 0.0) for name in self.lora_names]
            logger.info("LoRA scales %s", dict(zip(self.lora_names, weights, strict=True)))
            self.pipe.set_adapters(list(self.lora_names), adapter_weights=weights)
            self._lora = key.lora

    def _should_stop(self, batch: list[Job]) -> bool:
        """Called at each step: time out the batch's late jobs; stop if none of them is waiting."""
        with self._cond:
            now = time.monotonic()
            for job in batch:
                if not job.finished and now >= job.deadline:
                    self._end_locked(job, JobState.CANCELLED, _timeout_error())
            return all(job.finished for job in batch)

    # ---- bookkeeping (under the lock) ------------------------------------------------------------------
    def _end_locked(self, job: Job, state: JobState, error: BaseException | None) -> None:
        if job.finished:
            return
        job.state = state
        if error is None:
            job.future.cancel()
        elif not job.future.done():
            job.future.set_exception(error)

    def _fill_locked(self) -> int:
        head = self._pending[0]
        return sum(job.n for job in self._pending if job.key == head.key)

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._pending if now >= j.deadline]:
            self._pending.remove(job)
            self._end_locked(job, JobState.CANCELLED, _timeout_error())

    def _next_deadline_locked(self) -> float | None:
        if not self._pending:
            return None
        return max(0.0, min(j.deadline for j in self._pending) - time.monotonic())

    def _retry_after_locked(self) -> int:
        batches_ahead = len(self._pending) / self.max_batch + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    def _forget_old_locked(self) -> None:
        while len(self._jobs) > RECENT_JOBS:
            oldest = next(iter(self._jobs.values()))
            if not oldest.finished:
                break
            self._jobs.popitem(last=False)


def _timeout_error() -> JobTimeoutError:
    return JobTimeoutError("the request did not finish within the server's timeout (--timeout)")
