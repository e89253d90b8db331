"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2.

Programming errors (bugs) are not wrapped: they stay loud, with their traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for every error a user can cause; its message says what to do."""


class InvalidInputError(PipelineError, ValueError):
    """A request argument is out of range (size, steps, prompt list, output type...)."""


class ModelNotFoundError(PipelineError, FileNotFoundError):
    """The model path or hub id does not exist, or the hub cannot be reached."""


class UnsupportedModelError(PipelineError):
    """The folder is a diffusers model, but of a family or scheduler this project does not run."""


class BackendUnavailableError(PipelineError):
    """The requested backend cannot run here (for example rtx without a supported GPU)."""


class OutOfProfileError(PipelineError):
    """A request falls outside the shapes an engine was built for, and it cannot be widened."""


class InsufficientMemoryError(PipelineError):
    """The engines' memory plan does not fit the GPU's free memory (or the given VRAM budget)."""


class EnginesNotBuiltError(PipelineError):
    """backend="rtx" found no engines (or stale ones) for this model and GPU; the message names the command."""


class OutputError(PipelineError, OSError):
    """An output file or folder cannot be written."""


class CacheBusyError(PipelineError, TimeoutError):
    """A cache file stayed locked by another process for longer than this one waits for it."""


class LoraError(PipelineError):
    """A LoRA cannot be used: missing file, made for another architecture, a bad scale or adapter name."""
