"""What a request is while the server has it: `Job`, its `BatchKey` and `JobState`, the `BatchResult` it gets,
and the errors that end it instead (queue full, timed out, server stopping).

`service.py` makes the jobs, `worker.py` runs them, `app.py` turns their results and errors into responses.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class QueueFullError(Exception):
    """The queue holds `max_queue` waiting requests: come back after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobTimeoutError(Exception):
    """The request was not done within the server's --timeout (HTTP 504)."""


class ServiceStoppedError(Exception):
    """The server is stopping (or its worker died): the request was not run (HTTP 503)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class BatchKey:
    """What the jobs of one pipeline call must share."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None  # class name; None where the pipeline cannot switch schedulers
    lora: tuple[tuple[str, float], ...] = ()  # (name, scale), sorted; () is no LoRA


@dataclass
class Job:
    """One request: its prompt, one seed per image, and the future its images (or error) arrive on."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    seeds: list[int]
    key: BatchKey
    deadline: float  # time.monotonic() by which it must be answered
    future: Future[BatchResult] = field(default_factory=Future, repr=False)
    state: JobState = JobState.QUEUED
    batch_id: int | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass
class BatchResult:
    """What a job gets back: its images (PIL) and the settings the pipeline call resolved."""

    images: list[Any]
    settings: dict[str, Any]
    batch_id: int
    batch_images: int  # images in the whole pipeline call
    seconds: float
