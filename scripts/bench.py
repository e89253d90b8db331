"""Benchmark: adaptive inference measured, figure by figure, against diffusers' own pipeline (issue 7).

    python scripts/bench.py --model MODEL [--backend auto|torch|rtx] [--device cuda] [--dtype bf16]
                            [--height H --width W] [--steps N] [--iterations K] [--compile auto|on|off]
                            [--precision fp8] [--new-size WxH] [--no-diffusers] [--configs NAME ...]
                            [--cache-dir DIR] --json OUT.json --plot OUT.png

MODEL is a diffusers folder, a built-in tiny model (tiny-flux, tiny-sd, tiny-sdxl) or a named real-size
architecture built with random weights and no download (flux-dev, flux-schnell, sd15, sd21, sdxl). Every configuration serves
the same request (prompt, size, steps, guidance, seed) on the same weights:

  eager               our pipeline with nothing compiled and no CUDA graphs
  diffusers_eager     diffusers' FluxPipeline / StableDiffusion(XL)Pipeline built from the modules `eager` loaded
  diffusers_compiled  the same after diffusers' regional torch.compile (compile_repeated_blocks);
                      left out on CPU unless --configs names it
  adaptive            compile with the backend's default specialization (torch: generic dynamic-shape kernels),
                      iterations 1..K: 1 = fallback/compile, later = compiled
  adaptive_graphs     the same with the denoising step captured in a CUDA graph (CUDA only)
  static              compile + eager specialization, shapes built ahead by a warm-up call at the measured shape
  static_graphs       the same with CUDA graphs (the specialization decision: static vs dynamic-shape code);
                      only when --configs names it
  graphs_resnets      adaptive_graphs with the UNet's resnet blocks compiled as regions too; opt-in
  fp8_torchao         adaptive_graphs with fp8 Linear layers through torchao (per-row scales); opt-in
  fp8_scaled_mm       the same through our own torch._scaled_mm module; opt-in
  start               cold vs warm vs shipped start: the first image of a fresh process with an empty cache,
                      of a second fresh process reusing the cache the first one saved, and of a third with an
                      empty user folder and that cache shipped (caches/ + manifest, as prewarm.py ships it)

Each in-process configuration loads its own pipeline and compiles into empty caches (inductor, triton and the
project's cache folder), so its first call is an honest cold compile. Each call is timed between device
synchronizations; peak GPU memory is reset per configuration. Ratios are against diffusers eager and
diffusers compiled measured in the same run. Output: a table on stdout (printed last), the JSON with every figure and the environment, and
a bar chart in the style of TensorRT-RTX's adaptive-inference chart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import InvalidInputError, Pipeline, PipelineError, options
from pipeline.families import family_for
from pipeline.loading import resolve_model

logger = logging.getLogger("bench")

ALL_CONFIGS = (
    "eager",
    "diffusers_eager",
    "diffusers_compiled",
    "adaptive",
    "adaptive_graphs",
    "static",
    "static_graphs",
    "graphs_resnets",
    "fp8_torchao",
    "fp8_scaled_mm",
    "start",
)
OPT_IN_CONFIGS = (
    "static_graphs",
    "graphs_resnets",
    "fp8_torchao",
    "fp8_scaled_mm",
)  # measured only when --configs names them
DIFFUSERS_CONFIGS = ("diffusers_eager", "diffusers_compiled")

# Published by NVIDIA for TensorRT-RTX adaptive inference; a reference for the chart's shape, not our data.
TRT_RTX_REFERENCE = {
    "source": "TensorRT-RTX adaptive inference, as published by NVIDIA",
    "model": "FLUX.1-dev, FP8, 512x512",
    "gpu": "GeForce RTX 5090",
    "seconds": {
        "iteration 1 (fallback)": 6.46,
        "static": 3.64,
        "iteration 2": 3.15,
        "iteration 3": 2.94,
        "iteration 3 + CUDA graphs + runtime cache": 2.76,
    },
    "jit_seconds": {"without runtime cache": 31.92, "with runtime cache": 1.95},
    "note": "reference only: not measured by this script",
}

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
        "ours, + resnet regions + graphs", None, True, True, (("compile_resnets", True),)
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
    seconds, out = timed(
        lambda: pipe(
            request.prompt,
            height=height or request.height,
            width=width or request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=request.generator(),
            output_type="np",
        ),
        pipe.device,
    )
    return Call(seconds, dict(out.timings)), out.images


def final_latents(pipe: Pipeline, request: Request) -> torch.Tensor:
    """The request's final latents (untimed): what precision changes are judged on."""
    out = pipe(
        request.prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=request.generator(),
        output_type="latent",
    )
    return out.images.float().cpu()


def rel_l2(latents: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None or latents.shape != reference.shape:
        return None
    return float(torch.linalg.vector_norm(latents - reference) / torch.linalg.vector_norm(reference))


def call_diffusers(dpipe: Any, request: Request, device: torch.device) -> tuple[Call, np.ndarray]:
    seconds, out = timed(
        lambda: dpipe(
            request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=request.generator(),
            output_type="np",
        ),
        device,
    )
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


# ---- one function per measurement ------------------------------------------------------------------------


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


def measure_ours(
    setup: Setup, name: str, reference: np.ndarray | None, latents: torch.Tensor | None = None
) -> ConfigResult:
    """Iterations 1..K of a fresh pipeline in `name`'s configuration (static: after a warm-up call)."""
    spec = OURS[name]
    options = spec.options(setup.compile_on, setup.precision)
    if spec.cuda_graphs and setup.device.type != "cuda":
        return skipped(name, "CUDA graphs need a CUDA device", options=options)
    folder = setup.config_dir(name)
    with fresh_compile_caches(folder):
        baseline = reset_peak_memory(setup.device)
        try:
            pipe, load_s = setup.load(options, folder / "cache")
        except InvalidInputError as e:
            return skipped(name, f"backend rejected the options: {e}", options=options)
        result = ConfigResult(
            name, spec.label, options=options, backend=pipe.backend.describe(), load_s=load_s
        )
        load_peak = peak_memory_gib(setup.device, baseline)
        reset_peak_memory(setup.device)
        try:
            # static: calls[0] is the warm-up that builds the measured shape ahead, then K timed calls
            count = setup.iterations + (1 if name == "static" else 0)
            images = None
            for i in range(count):
                call, images = call_ours(pipe, setup.request)
                result.calls.append(call)
                logger.info("%s: call %d/%d %.3f s", name, i + 1, count, call.seconds)
            result.max_abs_diff = max_abs_diff(images, reference)
            result.latent_rel_l2 = rel_l2(final_latents(pipe, setup.request), latents)
            if setup.new_size and name.startswith("adaptive"):
                height, width = setup.new_size
                for _ in range(2):
                    call, _ = call_ours(pipe, setup.request, height, width)
                    result.new_size_calls.append(call)
                logger.info("%s: new size %dx%d first %.3f s", name, height, width, call.seconds)
            result.serving_peak_gib = peak_memory_gib(setup.device, baseline)
            result.peak_memory_gib = max(load_peak or 0.0, result.serving_peak_gib or 0.0) or None
        finally:
            finish(pipe, result)
            del pipe
            free_memory(setup.device)
    return result


def build_diffusers_pipeline(pipe: Pipeline) -> Any:
    """diffusers' own pipeline class around the modules `pipe` already loaded (no second load): tokenizers
    and a copy of the scheduler from the model folder, the pipeline options of its model_index.json
    (SDXL: force_zeros_for_empty_prompt), no safety checker, no watermark (ours adds none).

    A module ours runs in another dtype than the pipeline's (SDXL's VAE, upcast to float32 under fp16) is
    given to diffusers as a copy in the pipeline's dtype: diffusers upcasts it itself, per call, as it does."""
    import diffusers

    pipeline_cls = getattr(diffusers, pipe.source.pipeline_class)
    modules: dict[str, torch.nn.Module] = {}
    for engine in pipe.backend.engines.values():
        component, module = engine.stage.component, engine.module  # type: ignore[attr-defined]
        if pipe.family.component_dtype(component, pipe.dtype) != pipe.dtype:
            module = copy.deepcopy(module).to(pipe.dtype)
        modules[component] = module
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    index = pipe.source.model_index
    components: dict[str, Any] = {}
    for name in parameters:
        if name in modules:
            components[name] = modules[name]
        elif name.startswith("tokenizer"):
            components[name] = pipe.source.tokenizer(name)
        elif name == "scheduler":
            components[name] = copy.deepcopy(pipe.source.scheduler)
        elif name in ("safety_checker", "feature_extractor", "image_encoder"):
            components[name] = None
        elif name in index and not isinstance(index[name], list):
            components[name] = index[name]
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    if "add_watermarker" in parameters:
        components["add_watermarker"] = False
    dpipe = pipeline_cls(**components)
    dpipe.set_progress_bar_config(disable=True)
    return dpipe


def compile_diffusers_denoiser(dpipe: Any) -> str:
    """diffusers' regional compilation of its denoiser, in place; returns what was done."""
    name = "transformer" if getattr(dpipe, "transformer", None) is not None else "unet"
    denoiser = getattr(dpipe, name)
    if getattr(denoiser, "_repeated_blocks", None) and hasattr(denoiser, "compile_repeated_blocks"):
        denoiser.compile_repeated_blocks(fullgraph=True)
        return f"{name}.compile_repeated_blocks(fullgraph=True)"
    denoiser.compile(fullgraph=True)
    return f"{name}.compile(fullgraph=True)"


def measure_diffusers(
    setup: Setup,
    name: str,
    dpipe: Any,
    reference: np.ndarray | None,
    compile_denoiser: bool,
    baseline: int,
) -> ConfigResult:
    """`baseline`: bytes allocated before the shared modules were loaded (they count for diffusers too)."""
    result = ConfigResult(name, LABELS[name])
    reset_peak_memory(setup.device)
    if compile_denoiser:
        result.options = {"compile": compile_diffusers_denoiser(dpipe)}
    images = None
    for i in range(setup.iterations):
        call, images = call_diffusers(dpipe, setup.request, setup.device)
        result.calls.append(call)
        logger.info("%s: call %d/%d %.3f s", name, i + 1, setup.iterations, call.seconds)
    result.max_abs_diff = max_abs_diff(images, reference)
    result.peak_memory_gib = peak_memory_gib(setup.device, baseline)
    return result


def measure_eager_and_diffusers(
    setup: Setup, names: list[str]
) -> tuple[list[ConfigResult], np.ndarray | None, torch.Tensor | None]:
    """Ours eager, then diffusers eager and compiled on the very modules it loaded. Returns ours eager's
    images as the reference every other configuration is compared with."""
    options = OURS["eager"].options(compile_on=False, precision=setup.precision)
    folder = setup.config_dir("eager")
    results: list[ConfigResult] = []
    with fresh_compile_caches(folder):
        baseline = reset_peak_memory(setup.device)
        pipe, load_s = setup.load(options, folder / "cache")
        try:
            eager = ConfigResult(
                "eager", LABELS["eager"], options=options, backend=pipe.backend.describe(), load_s=load_s
            )
            reference = None
            for i in range(setup.iterations):
                call, reference = call_ours(pipe, setup.request)
                eager.calls.append(call)
                logger.info("eager: call %d/%d %.3f s", i + 1, setup.iterations, call.seconds)
            latents = final_latents(pipe, setup.request)
            eager.peak_memory_gib = peak_memory_gib(setup.device, baseline)
            if "eager" in names:
                results.append(eager)
            wanted = [n for n in DIFFUSERS_CONFIGS if n in names]
            dpipe = None
            if wanted and not all(hasattr(e, "module") for e in pipe.backend.engines.values()):
                results += [skipped(n, f"{pipe.backend.describe()} holds no torch modules") for n in wanted]
            elif wanted:
                dpipe = build_diffusers_pipeline(pipe)
                for name, compile_denoiser in (("diffusers_eager", False), ("diffusers_compiled", True)):
                    if name not in names:
                        continue
                    try:
                        results.append(
                            measure_diffusers(setup, name, dpipe, reference, compile_denoiser, baseline)
                        )
                    except Exception as e:  # a failing reference must not lose the other figures
                        logger.exception("%s failed", name)
                        results.append(
                            ConfigResult(name, LABELS[name], Status.FAILED, f"{type(e).__name__}: {e}")
                        )
                del dpipe
        finally:
            finish(pipe, None)
            del pipe
            free_memory(setup.device)
    return results, reference, latents


def measure_start(setup: Setup, argv_common: list[str]) -> list[ConfigResult]:
    """Cold, warm and shipped start, each in its own process: the first with an empty cache folder, the
    second with the folder the first one saved, the third with an empty user folder and the first one's cache
    shipped as prewarm.py ships it (caches/ + manifest). Inductor and triton get an empty folder in each, so
    only the project's persisted cache can help."""
    name = "adaptive_graphs" if setup.device.type == "cuda" else "adaptive"
    options = OURS[name].options(setup.compile_on, setup.precision)
    cache_dir = setup.config_dir("start") / "cache"
    results = [run_first_image_process(setup, "cold_start", options, cache_dir, argv_common)]
    if not results[0].ok:
        return [*results, *(skipped(n, "the cold-start process did not complete") for n in START_CONFIGS[1:])]
    shipped = ship_cache(cache_dir, setup.config_dir("shipped"))
    results.append(run_first_image_process(setup, "warm_start", options, cache_dir, argv_common))
    user_dir = setup.config_dir("shipped_start") / "cache"
    results.append(
        run_first_image_process(setup, "shipped_start", options, user_dir, argv_common, shipped_dir=shipped)
    )
    return results


def ship_cache(cache_dir: Path, shipped_dir: Path) -> Path:
    """Put the cache a process saved under `cache_dir` into a shipped-caches folder with its manifest entry,
    as scripts/prewarm.py does."""
    from pipeline.cache import SHIPPED_FILE, ShippedCache, atomic_write_bytes, sha256_file, update_manifest

    for cache in cache_dir.glob("*/runtime/*.cache"):
        model_key, platform_key = cache.parents[1].name, cache.stem
        target = shipped_dir / model_key / platform_key / SHIPPED_FILE
        atomic_write_bytes(target, cache.read_bytes())
        entry = ShippedCache(
            model_id=model_key.rsplit("-", 1)[0],
            model_hash=model_key.rsplit("-", 1)[1],
            model_key=model_key,
            platform_key=platform_key,
            backend=platform_key.split("-", 1)[0],
            precision="",
            files={SHIPPED_FILE: {"sha256": sha256_file(target), "size": target.stat().st_size}},
        )
        update_manifest(shipped_dir, entry)
    return shipped_dir


def run_first_image_process(
    setup: Setup,
    which: str,
    options: dict[str, Any],
    cache_dir: Path,
    argv_common: list[str],
    shipped_dir: Path | None = None,
) -> ConfigResult:
    folder = setup.config_dir(which)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "result.json"
    env = dict(os.environ)
    env["ADAPTIVE_DIFFUSION_SHIPPED_CACHES"] = str(shipped_dir or folder / "no-shipped-caches")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    env["TRITON_CACHE_DIR"] = str(folder / "triton")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *argv_common,
        "--cache-dir",
        str(cache_dir),
        "--worker-options",
        json.dumps(options),
        "--worker-out",
        str(out),
        "--worker-name",
        which,
    ]
    logger.info("%s: running the first image in a new process", which)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        status = Status.SKIPPED if proc.returncode == 2 else Status.FAILED
        logger.error("%s: process exited %d: %s", which, proc.returncode, " | ".join(tail))
        return ConfigResult(which, LABELS[which], status, f"exit {proc.returncode}: {' | '.join(tail)}")
    data = json.loads(out.read_text())
    data["calls"] = [Call(**c) for c in data["calls"]]
    result = ConfigResult(**data)
    result.process_s = process_s
    result.cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return result


def first_image_worker(setup: Setup, options: dict[str, Any], cache_dir: Path, out: Path, name: str) -> int:
    """Inside the subprocess: load, K calls, close (saves the cache); the result as JSON in `out`."""
    baseline = reset_peak_memory(setup.device)
    try:
        pipe, load_s = setup.load(options, cache_dir)
    except InvalidInputError as e:
        print(f"error: backend rejected the options: {e}", file=sys.stderr)
        return 2
    result = ConfigResult(name, LABELS[name], options=options, backend=pipe.backend.describe(), load_s=load_s)
    result.backend_stats = (
        {"loaded_before_first_call": asdict(pipe.backend.stats)} if hasattr(pipe.backend, "stats") else {}
    )
    for _ in range(setup.iterations):
        call, _ = call_ours(pipe, setup.request)
        result.calls.append(call)
    result.peak_memory_gib = peak_memory_gib(setup.device, baseline)
    result.cache_save_s, _ = timed(lambda: finish(pipe, result), setup.device)
    out.write_text(json.dumps(asdict(result)))
    return 0


# ---- the report -----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    def version(*dists: str) -> str | None:
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                return metadata.version(dist)
        return None

    env: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "capability": None,
        "cuda": torch.version.cuda,
        "versions": {
            "torch": torch.__version__,
            "triton": version("triton", "pytorch-triton"),
            "diffusers": version("diffusers"),
            "transformers": version("transformers"),
            "tensorrt_rtx": version("tensorrt-rtx", "tensorrt_rtx"),
            "numpy": np.__version__,
            "adaptive-diffusion": version("adaptive-diffusion"),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["device_memory_gib"] = round(props.total_memory / GIB, 1)
    return env


def by_name(results: list[ConfigResult]) -> dict[str, ConfigResult]:
    return {r.name: r for r in results}


def summary(results: list[ConfigResult]) -> dict[str, float | None]:
    """The ratios the issues ask about, from this run only."""
    r = by_name(results)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 and math.isfinite(a / b) else None

    def steady(name: str) -> float | None:
        return r[name].steady_s if name in r and r[name].ok else None

    def first(name: str) -> float | None:
        return r[name].first_s if name in r and r[name].ok else None

    def overhead(name: str) -> float | None:
        return r[name].warmup_overhead_s if name in r and r[name].ok else None

    out: dict[str, float | None] = {
        "cuda_graphs_speedup": ratio(steady("adaptive"), steady("adaptive_graphs")),
        "iteration1_over_steady_adaptive": ratio(first("adaptive"), steady("adaptive")),
        "static_over_adaptive_steady": ratio(steady("static"), steady("adaptive")),
        "static_graphs_over_adaptive_graphs_steady": ratio(
            steady("static_graphs"), steady("adaptive_graphs")
        ),
        "warm_over_cold_warmup_overhead": ratio(overhead("warm_start"), overhead("cold_start")),
        "warm_over_cold_first_call": ratio(first("warm_start"), first("cold_start")),
        "warm_start_overhead_s": overhead("warm_start"),
        "shipped_start_overhead_s": overhead("shipped_start"),
        "cold_start_first_call_s": first("cold_start"),
        "fp8_torchao_over_scaled_mm_steady": ratio(steady("fp8_torchao"), steady("fp8_scaled_mm")),
    }
    for name in ("adaptive", "adaptive_graphs"):
        if name in r and len(r[name].new_size_calls) == 2:
            first_new, second_new = (c.seconds for c in r[name].new_size_calls)
            out[f"new_size_first_over_second_{name}"] = ratio(first_new, second_new)
    return out


def vs_diffusers(result: ConfigResult, base: ConfigResult | None) -> dict[str, float | None]:
    """Speed-ups (diffusers' seconds / ours) and memory ratio against a diffusers configuration, same run."""
    if base is None or not base.ok or not result.ok:
        return {}
    out: dict[str, float | None] = {
        "steady_speedup": base.steady_s / result.steady_s if result.steady_s else None,  # type: ignore[operator]
        "first_call_speedup": base.first_s / result.first_s if result.first_s else None,  # type: ignore[operator]
    }
    if result.peak_memory_gib and base.peak_memory_gib:
        out["peak_memory_ratio"] = result.peak_memory_gib / base.peak_memory_gib
    return out


def report(setup: Setup, model: str, env: dict[str, Any], results: list[ConfigResult]) -> dict[str, Any]:
    base = by_name(results).get("diffusers_eager")
    compiled = by_name(results).get("diffusers_compiled")
    configs = {}
    for result in results:
        entry = asdict(result)
        entry["first_s"] = result.first_s
        entry["steady_s"] = result.steady_s
        entry["warmup_overhead_s"] = result.warmup_overhead_s
        entry["vs_diffusers_eager"] = vs_diffusers(result, base)
        entry["vs_diffusers_compiled"] = vs_diffusers(result, compiled)
        configs[result.name] = entry
    return {
        "model": model,
        "request": asdict(setup.request),
        "settings": {
            "backend": setup.backend,
            "dtype": setup.dtype,
            "iterations": setup.iterations,
            "compile": setup.compile_on,
            "precision": setup.precision,
            "new_size": list(setup.new_size) if setup.new_size else None,
            "timing": "wall seconds between device synchronizations; steady = median of calls 2..K",
            "compile_caches": "empty inductor/triton/project cache folders per configuration and per process",
        },
        "environment": env,
        "configs": configs,
        "summary": summary(results),
        "reference_trt_rtx": TRT_RTX_REFERENCE,
    }


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(data: dict[str, Any], results: list[ConfigResult]) -> str:
    req, env = data["request"], data["environment"]
    lines = [
        f"{data['model']}  {req['width']}x{req['height']}  {req['steps']} steps  guidance {req['guidance']}  "
        f"on {env['device_name']} ({env['device']})  torch {env['versions']['torch']}  "
        f"diffusers {env['versions']['diffusers']}  {env['date']}",
        "",
        f"{'configuration':<36} {'first s':>9} {'steady s':>9} {'vs eager':>9} {'vs compiled':>11} "
        f"{'peak GiB':>9} {'serving':>8}  notes   (vs: diffusers' steady seconds / ours, same run)",
    ]
    for result in results:
        ratios = data["configs"][result.name]["vs_diffusers_eager"]
        against_compiled = data["configs"][result.name]["vs_diffusers_compiled"]
        if result.ok:
            note = ", ".join(f"{k}={v}" for k, v in result.options.items())
            if result.max_abs_diff is not None:
                note += f"; max|Δ| vs ours eager {result.max_abs_diff:.2g}"
            if result.latent_rel_l2 is not None:
                note += f"; latents rel L2 {result.latent_rel_l2:.2g}"
        else:
            note = f"{result.status}: {result.reason}"
        lines.append(
            f"{result.label:<36} {fmt(result.first_s):>9} {fmt(result.steady_s):>9} "
            f"{fmt(ratios.get('steady_speedup'), '.2f', 'x'):>9} "
            f"{fmt(against_compiled.get('steady_speedup'), '.2f', 'x'):>11} "
            f"{fmt(result.peak_memory_gib, '.2f'):>9} {fmt(result.serving_peak_gib, '.2f'):>8}  {note}"
        )
    lines += ["", "per call (seconds): total = text encoders + denoise + VAE decoder"]
    for result in results:
        for i, call in enumerate(result.calls, 1):
            parts = " + ".join(fmt(call.stages.get(s)) for s in ("text_encoders", "denoise", "vae_decoder"))
            stages = f" = {parts}" if call.stages else ""
            lines.append(f"  {result.name:<20} call {i}: {call.seconds:8.3f}{stages}")
        for i, call in enumerate(result.new_size_calls, 1):
            lines.append(f"  {result.name:<20} new size call {i}: {call.seconds:8.3f}")
    r = by_name(results)
    if "cold_start" in r:
        lines += ["", "start in a new process (load = from_pretrained, overhead = first call - steady)"]
        for name in START_CONFIGS:
            if name in r and r[name].ok:
                x = r[name]
                lines.append(
                    f"  {x.label:<28} process {fmt(x.process_s, '.2f')} s  load {fmt(x.load_s, '.2f')} s  "
                    f"first call {fmt(x.first_s)} s  steady {fmt(x.steady_s)} s  "
                    f"overhead {fmt(x.warmup_overhead_s)} s  cache {x.cache_bytes or 0} bytes"
                )
    lines += ["", "summary: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in data["summary"].items())]
    return "\n".join(lines)


def chart_bars(results: list[ConfigResult], iterations: int) -> list[tuple[str, float, str]]:
    """(label, seconds, group) in the order of TensorRT-RTX's adaptive-inference chart, then diffusers."""
    r = {k: v for k, v in by_name(results).items() if v.ok}
    bars: list[tuple[str, float, str]] = []
    if "adaptive" in r:
        bars.append(("iteration 1\n(fallback/compile)", r["adaptive"].calls[0].seconds, "ours"))
    if "static" in r:
        bars.append(("static", r["static"].steady_s or 0.0, "ours"))
    if "adaptive" in r:
        for i, call in enumerate(r["adaptive"].calls[1:], 2):
            bars.append((f"iteration {i}", call.seconds, "ours"))
    final = r.get("warm_start")
    if final is not None and final.options.get("cuda_graphs"):
        bars.append((f"iteration {iterations}\n+ CUDA graphs + cache", final.calls[-1].seconds, "ours"))
    elif "adaptive_graphs" in r:
        bars.append(
            (f"iteration {iterations}\n+ CUDA graphs", r["adaptive_graphs"].calls[-1].seconds, "ours")
        )
    elif final is not None:
        bars.append((f"iteration {iterations}\n+ cache (new process)", final.calls[-1].seconds, "ours"))
    for name, text in (
        ("diffusers_eager", "diffusers\neager"),
        ("diffusers_compiled", "diffusers\ncompiled"),
    ):
        if name in r:
            bars.append((text, r[name].steady_s or 0.0, "diffusers"))
    return bars


def write_chart(data: dict[str, Any], results: list[ConfigResult], path: Path, iterations: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no chart written (pip install matplotlib)")
        return False
    bars = chart_bars(results, iterations)
    colors = {"ours": "#76b900", "diffusers": "#8c8c8c"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars)), 4.8), dpi=120)
    xs = range(len(bars))
    drawn = ax.bar(xs, [b[1] for b in bars], color=[colors[b[2]] for b in bars], width=0.65)
    ax.bar_label(drawn, labels=[f"{b[1]:.2f} s" for b in bars], padding=3, fontsize=9)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per image")
    ax.margins(y=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    req, env = data["request"], data["environment"]
    ax.set_title(
        f"{data['model']}  {req['width']}x{req['height']}, {req['steps']} steps, "
        f"{env['device_name']}\nadaptive inference (green) vs diffusers (grey)",
        fontsize=10,
    )
    fig.text(
        0.01,
        0.01,
        f"torch {env['versions']['torch']}, diffusers {env['versions']['diffusers']}, {env['date']}",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


# ---- command line ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width), the order the measurements use."""
    try:
        width, height = options.parse_size(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="folder, tiny-flux / tiny-sd / tiny-sdxl, or flux-dev / flux-schnell / sd15 / sd21 / sdxl",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "rtx"))
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: the pipeline's)")
    p.add_argument(
        "--precision", default=None, choices=("fp8",), help="fp8 denoiser Linear layers (dtype: --dtype)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=3, help="calls per configuration (K >= 1)")
    p.add_argument(
        "--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile (auto: on for CUDA)"
    )
    p.add_argument(
        "--new-size", type=parse_size, default=None, help="WIDTHxHEIGHT served after the K calls (adaptive)"
    )
    p.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=None, help="default: all that fit")
    p.add_argument("--no-diffusers", action="store_true", help="leave out diffusers' pipelines")
    p.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are made")
    p.add_argument("--work-dir", type=Path, default=None, help="keep per-configuration caches here")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-options", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-name", default="cold_start", help=argparse.SUPPRESS)
    return p


def selected_configs(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.configs:
        names = list(args.configs)
    else:
        names = [n for n in ALL_CONFIGS if n not in OPT_IN_CONFIGS]
        names = [n for n in names if not (n == "diffusers_compiled" and device.type == "cpu")]
    if args.no_diffusers:
        names = [n for n in names if n not in DIFFUSERS_CONFIGS]
    return names


def make_setup(args: argparse.Namespace, work_dir: Path) -> Setup:
    from pipeline.options import parse_device

    if args.iterations < 1:
        raise InvalidInputError(f"--iterations must be at least 1, got {args.iterations}")
    device = parse_device(args.device)
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    family = family_for(source)
    request = Request(
        prompt=args.prompt,
        height=args.height or family.default_size,
        width=args.width or family.default_size,
        steps=args.steps or family.default_steps,
        guidance=args.guidance if args.guidance is not None else family.default_guidance,
        seed=args.seed,
    )
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    setup = Setup(
        model_path=source.path,
        backend=args.backend,
        device=device,
        dtype=args.dtype,
        request=request,
        iterations=args.iterations,
        compile_on=compile_on,
        precision=args.precision,
        new_size=args.new_size,
        work_dir=work_dir,
    )
    return setup


def worker_argv(args: argparse.Namespace, setup: Setup) -> list[str]:
    """The arguments a first-image subprocess needs to serve the same request."""
    r = setup.request
    argv = ["--model", str(setup.model_path), "--backend", setup.backend, "--device", str(setup.device)]
    argv += ["--height", str(r.height), "--width", str(r.width), "--steps", str(r.steps)]
    argv += ["--guidance", repr(r.guidance), "--prompt", r.prompt, "--seed", str(r.seed)]
    argv += ["--iterations", str(setup.iterations), "--json", os.devnull, "--log-level", args.log_level]
    if setup.dtype:
        argv += ["--dtype", setup.dtype]
    return argv


def run(args: argparse.Namespace, work_dir: Path) -> int:
    setup = make_setup(args, work_dir)
    if args.worker_out:
        options = json.loads(args.worker_options)
        return first_image_worker(setup, options, args.cache_dir, args.worker_out, args.worker_name)

    names = selected_configs(args, setup.device)
    logger.info("configurations: %s", ", ".join(names))
    results: list[ConfigResult] = []
    reference = latents = None
    if "eager" in names or any(n in names for n in DIFFUSERS_CONFIGS):
        measured, reference, latents = measure_eager_and_diffusers(setup, names)
        results += measured
    for name in MEASURED_OURS:
        if name not in names:
            continue
        try:
            results.append(measure_ours(setup, name, reference, latents))
        except Exception as e:  # one failing configuration must not lose the others' figures
            logger.exception("%s failed", name)
            results.append(ConfigResult(name, LABELS[name], Status.FAILED, f"{type(e).__name__}: {e}"))
    if "start" in names:
        results += measure_start(setup, worker_argv(args, setup))

    data = report(setup, args.model, environment(setup.device), results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    logger.info("wrote %s", args.json)
    if args.plot and write_chart(data, results, args.plot, setup.iterations):
        logger.info("wrote %s", args.plot)
    print(table(data, results))
    return 1 if any(r.status == Status.FAILED for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        try:
            return run(args, work_dir)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
