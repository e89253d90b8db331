"""scripts/bench.py: what one run measures (requests, configurations, results), how a call is timed, and what every
measurement shares (Setup)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import Pipeline

logger = logging.getLogger("bench")

BACKGROUND_TIMEOUT_S = 600  # waiting for regions compiling in the background
GIB = 1024**3


# ---- what is measured ---------------------------------------------------------------------------------------


class Status(StrEnum):
    OK = "ok"
    SKIPPED = "skipped"  # cannot run here (option not supported, no CUDA): says why
    FAILED = "failed"  # raised: says what; the run goes on and exits 1


@dataclass(frozen=True)
class Request:
    """One text-to-image request, served identically by every configuration."""

    prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int

    def generator(self) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(self.seed)

    def call(self, pipe: Any, output_type: str, height: int = 0, width: int = 0) -> Any:
        """This request through `pipe` (ours or diffusers': the same argument names), at another size if given."""
        return pipe(
            self.prompt,
            height=height or self.height,
            width=width or self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=self.generator(),
            output_type=output_type,
        )


@dataclass(frozen=True)
class OursSpec:
    """Backend options of one configuration of our pipeline (names as TorchBackend takes them)."""

    label: str
    specialization: str | None  # None: the backend's default (torch: "none", generic dynamic-shape code)
    cuda_graphs: bool
    compiled: bool  # follows --compile when True, forced off when False
    extra: tuple[tuple[str, Any], ...] = ()  # options of this configuration only (fp8 kernels)

    def options(self, compile_on: bool, precision: str | None) -> dict[str, Any]:
        opts: dict[str, Any] = {"compile": self.compiled and compile_on, "cuda_graphs": self.cuda_graphs}
        if self.specialization is not None:
            opts["specialization"] = self.specialization
        if precision:
            opts["precision"] = precision
        opts.update(self.extra)
        return opts


OURS = {
    "eager": OursSpec("ours, eager", "none", cuda_graphs=False, compiled=False),
    "adaptive": OursSpec("ours, adaptive (compile)", None, cuda_graphs=False, compiled=True),
    "adaptive_graphs": OursSpec("ours, adaptive + CUDA graphs", None, cuda_graphs=True, compiled=True),
    "static": OursSpec("ours, static (built ahead)", "eager", cuda_graphs=False, compiled=True),
    "static_graphs": OursSpec("ours, static + CUDA graphs", "eager", cuda_graphs=True, compiled=True),
    "graphs_resnets": OursSpec(
        "ours, + resnet regions + graphs (UNets)", None, True, True, (("compile_resnets", "on"),)
    ),
    "graphs_background": OursSpec(
        "ours, resnet regions compiled in the background + graphs",
        None,
        True,
        True,
        (("compile_resnets", "background"),),
    ),
    "graphs_conv1x1_mm": OursSpec(
        "ours, 1x1 convolutions as GEMMs (conv_1x1_as_mm, SD's default) + graphs",
        None,
        True,
        True,
        (("inductor_options", {"conv_1x1_as_mm": True}),),
    ),
    "graphs_nchw": OursSpec(
        "ours, NCHW UNet (channels_last off) + graphs", None, True, True, (("channels_last", False),)
    ),
    "graphs_flash": OursSpec(
        "ours, flash attention (not cuDNN's) + graphs", None, True, True, (("attention", "flash"),)
    ),
    "graphs_cudnn_self": OursSpec(
        "ours, cuDNN self-attention, flash cross-attention + graphs",
        None,
        True,
        True,
        (("attention", "cudnn-self"),),
    ),
    "fp8_torchao": OursSpec(
        "ours, fp8 torchao + graphs", None, True, True, (("precision", "fp8"), ("fp8_kernel", "torchao"))
    ),
    "fp8_scaled_mm": OursSpec(
        "ours, fp8 own _scaled_mm + graphs",
        None,
        True,
        True,
        (("precision", "fp8"), ("fp8_kernel", "scaled_mm")),
    ),
    "fp8_attention": OursSpec(
        "ours, fp8 own _scaled_mm + fp8 attention (cuDNN) + graphs",
        None,
        True,
        True,
        (("precision", "fp8"), ("fp8_kernel", "scaled_mm"), ("attention", "fp8")),
    ),
}
MEASURED_OURS = tuple(name for name in OURS if name != "eager")  # eager is measured with diffusers
LABELS = {
    **{name: spec.label for name, spec in OURS.items()},
    "diffusers_eager": "diffusers, eager",
    "diffusers_compiled": "diffusers, compile_repeated_blocks",
    "cold_start": "new process, empty cache",
    "warm_start": "new process, warm cache",
    "shipped_start": "new process, shipped cache",
}
START_CONFIGS = ("cold_start", "warm_start", "shipped_start")


@dataclass
class Call:
    """One timed call: wall seconds between device synchronizations, and the pipeline's stage laps."""

    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class ConfigResult:
    """Everything measured for one configuration. `calls[0]` is the first call (fallback / compile /
    warm-up); the steady state is the median of the calls after it."""

    name: str
    label: str
    status: Status = Status.OK
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    load_s: float | None = None
    calls: list[Call] = field(default_factory=list)
    new_size_calls: list[Call] = field(default_factory=list)  # --new-size: first and second call there
    # regions compiled in the background (torch, compile_resnets="background"): waited for after the first
    # call (and after the first at the new size); the call after each swap recaptures the CUDA graphs
    background_s: float | None = None
    recapture_s: float | None = None
    new_size_background_s: float | None = None
    peak_memory_gib: float | None = None  # loading and serving, above what was allocated before loading
    serving_peak_gib: float | None = None  # the same, counted from the end of loading (weights + work)
    max_abs_diff: float | None = None  # images against ours eager, same request
    latent_rel_l2: float | None = None  # final latents against ours eager: |a - b| / |b|
    process_s: float | None = None  # start only: the whole subprocess, imports included
    cache_save_s: float | None = None  # start only: pipe.close() persisting the cache
    cache_bytes: int | None = None  # start only: size of the cache folder after the process
    backend_stats: dict[str, Any] = field(default_factory=dict)  # what the backend says it spent (if it says)

    @property
    def ok(self) -> bool:
        return self.status == Status.OK and bool(self.calls)

    @property
    def first_s(self) -> float | None:
        return self.calls[0].seconds if self.calls else None

    @property
    def steady_s(self) -> float | None:
        if not self.calls:
            return None
        later = self.calls[1:] or self.calls
        return statistics.median(c.seconds for c in later)

    @property
    def warmup_overhead_s(self) -> float | None:
        """First call minus the steady state: what compiling / specializing / capturing cost."""
        if not self.calls or self.steady_s is None:
            return None
        return self.calls[0].seconds - self.steady_s


def skipped(name: str, reason: str, **extra: Any) -> ConfigResult:
    logger.warning("%s: skipped (%s)", name, reason)
    return ConfigResult(name, LABELS[name], status=Status.SKIPPED, reason=reason, **extra)


# ---- timing ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak counter; return the bytes allocated now (what earlier configurations still hold)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_gib(device: torch.device, baseline: int) -> float | None:
    """Peak GPU memory of one configuration: its weights and work, above what was allocated before it loaded
    (in one process, memory an earlier configuration leaves behind must not count against the next)."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - baseline) / GIB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def call_ours(pipe: Pipeline, request: Request, height: int = 0, width: int = 0) -> tuple[Call, np.ndarray]:
    seconds, out = timed(lambda: request.call(pipe, "np", height, width), pipe.device)
    return Call(seconds, dict(out.timings)), out.images


def settle_background(
    pipe: Pipeline, setup: Setup, height: int = 0, width: int = 0
) -> tuple[float | None, float | None]:
    """Wait for regions compiling in the background and make one call that swaps them in (and recaptures the
    CUDA graphs): what follows is the steady state a user reaches. Returns (seconds waited, that call)."""
    backend = pipe.backend
    if not getattr(backend, "background_busy", False):
        return None, None
    start = time.perf_counter()
    if not backend.wait_background(BACKGROUND_TIMEOUT_S):
        backend.stop_background()
        logger.warning("background compiles did not finish in %d s; stopped", BACKGROUND_TIMEOUT_S)
    waited = time.perf_counter() - start
    call, _ = call_ours(pipe, setup.request, height, width)
    logger.info("background compiles: %.1f s; the call swapping them in %.3f s", waited, call.seconds)
    return waited, call.seconds


def final_latents(pipe: Pipeline, request: Request) -> torch.Tensor:
    """The request's final latents (untimed): what precision changes are judged on."""
    return request.call(pipe, "latent").images.float().cpu()


def rel_l2(latents: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None or latents.shape != reference.shape:
        return None
    return float(torch.linalg.vector_norm(latents - reference) / torch.linalg.vector_norm(reference))


def call_diffusers(dpipe: Any, request: Request, device: torch.device) -> tuple[Call, np.ndarray]:
    seconds, out = timed(lambda: request.call(dpipe, "np"), device)
    return Call(seconds), out.images


def max_abs_diff(images: np.ndarray, reference: np.ndarray | None) -> float | None:
    if reference is None or np.shape(images) != np.shape(reference):
        return None
    return float(np.max(np.abs(np.asarray(images, dtype=np.float32) - reference)))


@contextlib.contextmanager
def fresh_compile_caches(folder: Path) -> Iterator[None]:
    """Point inductor and triton at an empty folder and drop compiled code held in memory, so whatever the
    configuration compiles, it compiles cold (and nothing it compiles helps the next configuration)."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    torch.compiler.reset()
    try:
        yield
    finally:
        torch.compiler.reset()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class Setup:
    """What every measurement shares."""

    model_path: Path
    backend: str
    device: torch.device
    dtype: str | None
    request: Request
    iterations: int
    compile_on: bool
    precision: str | None
    new_size: tuple[int, int] | None
    work_dir: Path

    def config_dir(self, name: str) -> Path:
        return self.work_dir / name

    def load(self, options: dict[str, Any], cache_dir: Path) -> tuple[Pipeline, float]:
        seconds, pipe = timed(
            lambda: Pipeline.from_pretrained(
                self.model_path,
                backend=self.backend,
                device=self.device,
                dtype=self.dtype,
                cache_dir=cache_dir,
                build=True,  # rtx: engines missing from this cache folder are built (load time includes it)
                **options,
            ),
            self.device,
        )
        pipe.progress = False
        return pipe, seconds


def finish(pipe: Pipeline, result: ConfigResult | None) -> None:
    """Record the backend's own stats, save its cache."""
    backend = pipe.backend
    stats = getattr(backend, "stats", None)
    if result is not None and stats is not None and dataclasses.is_dataclass(stats):
        result.backend_stats = asdict(stats)
    pipe.close()
