"""The torch backend: each stage is the diffusers module itself, made fast three ways.

1. Compiled regions, ahead of time: the denoiser's repeated blocks are compiled once per block kind with
   dynamic shapes (torch_compile.py) and the artifacts persist, so a new process loads compiled code instead
   of tracing it.
2. A CUDA graph of the whole denoising step (denoiser + guidance + schedule update), captured once per shape
   over static buffers (denoise.StepGraph) and replayed for every step: no host sync, no launch cost.
3. One persistent compile cache per model and platform (compile_cache.py, in pipeline/cache's locked,
   atomic, validated container), merged on save, shipped by scripts/prewarm.py.

Options (same names as the rtx backend where they mean the same): compile, cuda_graphs, specialization
(none | eager), precision (fp8: Linear layers in float8), and the measured tuning knobs `attention`,
`fp8_kernel` and `compile_vae` (defaults below, each with its measurement).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError
from ..families import Family, StageSpec
from ..families.base import Tensors
from .base import Backend, Precision, Specialization, parse_precision
from .compile_cache import INDUCTOR_GROUP, ArtifactStore, load_store, save_store
from .fusion import fuse_projections
from .torch_compile import (
    RESNET_REGIONS,
    CompiledForward,
    RegionCompiler,
    RegionStats,
    configure_dynamo,
    wrap_regions,
)

if TYPE_CHECKING:
    from ..cache import ModelCache
    from ..denoise import DenoiseState, StepGraph

logger = logging.getLogger(__name__)

OPTIONS = (
    "compile",
    "cuda_graphs",
    "specialization",
    "precision",
    "attention",
    "fp8_kernel",
    "compile_vae",
    "compile_resnets",
    "autotune",
)
_PLUMBING = ("cache_dir", "model_cache")  # passed by the pipeline, not by users
# Inductor options for the regions. Default mode: the large GEMMs go to cuBLAS either way; Inductor's own
# CUDA graphs stay off (we capture the whole step ourselves).
INDUCTOR_OPTIONS: dict[str, Any] = {}
# autotune=True: Inductor benchmarks Triton GEMM templates against cuBLAS for each GEMM while it compiles.
# What it picks is baked into the ahead-of-time artifact, so it is paid once, kept in the model's compile
# cache and shipped with it by prewarm.py. Off by default: on the H200 (FLUX.1-dev 1024², torch 2.11,
# 2026-12-01, scripts/profile_step.py) cuBLAS won every large GEMM, steady 3.997 s against 3.983 s
# without, and the first call's compile took 108 s instead of 25 s.
AUTOTUNE_OPTIONS: dict[str, Any] = {"max_autotune": True, "max_autotune_gemm": True}
# The VAE decoder stays eager by default: on an H100 (FLUX-dev, 512x512, 2026-11-24, scripts/bench.py)
# compiling it took 42-45 s of a 59 s first call for a decode of 0.018 s compiled vs 0.024 s eager.
DEFAULT_COMPILE_VAE = False
# Attention on CUDA. "auto": cuDNN's fused attention on Hopper and newer, where it measured 0.41 ms against
# flash attention's 0.78 ms at FLUX-dev 1024x1024's shape on an H100 (relative difference 3e-3;
# the since-removed scripts/gpu_check.py, 2026-11-23); torch's own choice elsewhere.
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "default")
# fp8 Linear kernels: torchao's Float8DynamicActivationFloat8WeightConfig (per-row scales) or our own
# torch._scaled_mm module (fp8.py); see fp8.py for which is the default and why.
FP8_KERNELS = ("torchao", "scaled_mm")
SPECIALIZATIONS = (Specialization.NONE, Specialization.EAGER)
# The UNets' ResnetBlock2D as regions too (besides their attention blocks). Off by default: each of their
# dozen shapes is one more artifact to compile cold; see the README for the measured trade-off.
DEFAULT_COMPILE_RESNETS = False


def choose_attention(device: torch.device, choice: str) -> str:
    """Set torch's (process-wide) SDPA backend flags for `choice`; returns the backend in use."""
    if device.type != "cuda" or choice == "default":
        return "default"
    if choice == "auto":
        choice = "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "default"
        if choice == "default":
            return choice
    torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
    torch.backends.cuda.enable_flash_sdp(choice == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    logger.info("attention: %s fused attention", "cuDNN" if choice == "cudnn" else "flash")
    return choice


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend's options, checked."""

    compile: bool
    cuda_graphs: bool
    specialization: Specialization
    precision: Precision | None
    attention: str = "auto"
    fp8_kernel: str | None = None  # None: fp8.DEFAULT_KERNEL
    compile_vae: bool = DEFAULT_COMPILE_VAE
    compile_resnets: bool = DEFAULT_COMPILE_RESNETS
    autotune: bool = False

    @classmethod
    def parse(cls, device: torch.device, options: dict[str, Any]) -> TorchOptions:
        unknown = sorted(set(options) - set(OPTIONS) - set(_PLUMBING))
        if unknown:
            raise InvalidInputError(
                f"unknown torch backend option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        cuda = device.type == "cuda"
        compile_ = _flag(options, "compile", default=cuda)
        graphs = _flag(options, "cuda_graphs", default=cuda)
        if graphs and not cuda:
            raise InvalidInputError(
                f"cuda_graphs needs a CUDA device, this is {device.type}; drop --cuda-graphs"
            )
        specialization = _choice(options, "specialization", Specialization, Specialization.NONE)
        if specialization not in SPECIALIZATIONS:
            raise InvalidInputError(
                "specialization lazy is a TensorRT-RTX option; the torch backend serves every size with "
                "generic dynamic-shape kernels (none, the default) or static ones per size (eager)"
            )
        precision = parse_precision(options.get("precision"))
        if precision is Precision.FP8:
            from .fp8 import fp8_supported

            ok, why = fp8_supported(device)
            if not ok:
                raise InvalidInputError(f"precision fp8 cannot run here: {why}; leave precision unset")
        attention = options.get("attention") or "auto"
        if attention not in ATTENTION_CHOICES:
            raise InvalidInputError(
                f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}"
            )
        kernel = options.get("fp8_kernel")
        if kernel is not None and kernel not in FP8_KERNELS:
            raise InvalidInputError(f"fp8_kernel must be one of {', '.join(FP8_KERNELS)}, got {kernel!r}")
        vae = _flag(options, "compile_vae", default=DEFAULT_COMPILE_VAE)
        resnets = _flag(options, "compile_resnets", default=DEFAULT_COMPILE_RESNETS)
        autotune = _flag(options, "autotune", default=False)
        return cls(compile_, graphs, specialization, precision, attention, kernel, vae, resnets, autotune)


def _flag(options: dict[str, Any], name: str, default: bool) -> bool:
    value = options.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInputError(f"option {name} must be true or false, got {value!r}")
    return value


def _choice(options: dict[str, Any], name: str, enum: Any, default: Any) -> Any:
    value = options.get(name)
    if value is None:
        return default
    try:
        return enum(value)
    except ValueError:
        raise InvalidInputError(
            f"{name} must be one of {', '.join(v.value for v in enum)}, got {value!r}"
        ) from None


class TorchEngine:
    """One stage: a diffusers/transformers module called as `engine(**inputs) -> {name: tensor}`."""

    def __init__(self, stage: StageSpec, module: torch.nn.Module) -> None:
        self.stage = stage
        self.module = module

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.stage.forward(self.module, inputs)


@dataclass
class TorchStats:
    """What the backend spent on compiling and capturing, and what the cache gave."""

    cache_loaded_bytes: int = 0
    cache_load_s: float = 0.0
    cache_artifacts: int = 0
    captures: dict[str, float] = field(default_factory=dict)
    regions: RegionStats = field(default_factory=RegionStats)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        self.options = TorchOptions.parse(device, options)
        super().__init__(family, device, dtype)
        self.attention = choose_attention(device, self.options.attention)
        self.stats = TorchStats()
        from ..cache import ModelCache

        self.model_cache: ModelCache = options.get("model_cache") or ModelCache.for_model(
            family.source, "torch", device, options.get("cache_dir")
        )
        self.hooks: list[CompiledForward] = []
        self.compiler: RegionCompiler | None = None
        self._graphs: dict[tuple[Any, ...], StepGraph] = {}
        self._pool: Any = None
        self._graphed_calls: dict[str, Any] = {}  # denoise.CudaGraphCall per name (own-step schedulers)
        self._bypass = False

        source = family.source
        self.fp8_kernel: str | None = None
        if self.options.precision is Precision.FP8:
            from .fp8 import DEFAULT_KERNEL

            self.fp8_kernel = self.options.fp8_kernel or DEFAULT_KERNEL
        # fp8 with our kernel on a family whose attention reads fused layers by a flag (FLUX): quantized and
        # fused block by block while loading, so the bf16 model is never whole on the GPU.
        streamed = self.fp8_kernel == "scaled_mm" and family.fp8_while_loading
        denoiser_component = family.stages[family.denoiser].component
        modules: dict[str, torch.nn.Module] = {}
        for stage in family.stages.values():
            if stage.component not in modules:
                component_dtype = family.component_dtype(stage.component, dtype)  # SDXL: fp32 VAE under fp16
                per_part = (
                    functools.partial(_fp8_part, device=device)
                    if streamed and stage.component == denoiser_component
                    else None
                )
                modules[stage.component] = source.load_component(
                    stage.component, component_dtype, device, per_part=per_part
                )
        self.modules = modules
        denoiser = modules[denoiser_component]
        if not streamed:
            fuse_projections(denoiser)  # one GEMM for Q, K and V
            if self.fp8_kernel is not None:
                from .fp8 import quantize_linears

                quantize_linears(denoiser, kernel=self.fp8_kernel)
        if device.type == "cuda" and "vae" in modules:
            modules["vae"].to(memory_format=torch.channels_last)
        if self.options.compile:
            self._prepare_compile(denoiser, modules.get("vae"))
        for stage in family.stages.values():
            self.engines[stage.name] = TorchEngine(stage, modules[stage.component])

    # ---- compile --------------------------------------------------------------------------------------
    def _prepare_compile(self, denoiser: torch.nn.Module, vae: torch.nn.Module | None) -> None:
        configure_dynamo()
        store = self._load_compile_cache()
        tag = f"attn-{self.attention}" + (f"-fp8-{self.fp8_kernel}" if self.fp8_kernel else "")
        inductor = dict(INDUCTOR_OPTIONS)
        if self.options.autotune:
            tag += "-autotune"  # its artifacts hold other kernels: never mixed with the default ones
            inductor |= AUTOTUNE_OPTIONS
        self.compiler = RegionCompiler(
            store, specialization=self.options.specialization, options=inductor, tag=tag
        )
        self.stats.regions = self.compiler.stats
        extra = RESNET_REGIONS if self.options.compile_resnets else ()
        self.hooks = wrap_regions(denoiser, self.compiler, extra)
        n_vae = 0
        if vae is not None and self.options.compile_vae:
            vae_hooks = wrap_regions(vae.decoder, self.compiler, RESNET_REGIONS)
            n_vae = len(vae_hooks)
            self.hooks += vae_hooks
        loaded = self.compiler.preload()
        logger.info(
            "torch.compile: %d denoiser regions, %d VAE decoder regions, %s shapes; %d compiled artifacts "
            "loaded in %.2f s",
            len(self.hooks) - n_vae,
            n_vae,
            "dynamic" if self.compiler.dynamic else "static",
            loaded,
            self.compiler.stats.load_s,
        )

    def _load_compile_cache(self) -> ArtifactStore:
        from ..cache import resolve_runtime_cache

        path = resolve_runtime_cache(self.model_cache)
        if path is None:
            logger.info("no compile cache yet for %s; compiling from scratch", self.model_cache.model_key)
            return ArtifactStore()
        start = time.perf_counter()
        store = load_store(path, self.model_cache.platform_key)
        for key in store.keys(INDUCTOR_GROUP):  # Inductor's own caches: kernels of JIT-compiled regions
            try:
                torch.compiler.load_cache_artifacts(store.get(key))
            except Exception as e:  # an unreadable snapshot is a miss, never a crash
                logger.warning("ignoring Inductor cache snapshot %s: %s", key, e)
                store.discard(key)
        self.stats.cache_loaded_bytes = store.nbytes
        self.stats.cache_artifacts = len(store.entries)
        self.stats.cache_load_s = time.perf_counter() - start
        logger.info(
            "compile cache %s: %d artifacts, %.1f MB read in %.2f s",
            path,
            len(store.entries),
            store.nbytes / 1e6,
            self.stats.cache_load_s,
        )
        return store

    def save_compile_cache(self) -> bool:
        """Merge what was compiled into the model's cache file. Returns whether the file was written."""
        if self.compiler is None:
            return False
        store = self.compiler.store
        if self.compiler.stats.jit_kinds:  # regions on the JIT fallback persist through Inductor's caches
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None and saved[0]:
                store.add(INDUCTOR_GROUP, saved[0])
        meta = {"kind": "torch-compile", "attention": self.attention, "fp8_kernel": self.fp8_kernel}
        return save_store(store, self.model_cache.runtime_cache_path, self.model_cache.platform_key, meta)

    def close(self) -> None:
        self.save_compile_cache()

    def describe(self) -> str:
        o = self.options
        parts = [
            "compiled" if o.compile else "eager",
            "cuda graphs" if o.cuda_graphs else "no graphs",
            f"specialization {o.specialization.value}" if o.compile else "",
            f"precision {o.precision.value}" + (f" ({self.fp8_kernel})" if self.fp8_kernel else "")
            if o.precision
            else "",
        ]
        return f"torch ({', '.join(p for p in parts if p)})"

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Inside, the modules run eagerly and the loop without CUDA graphs, whatever the options (to compare
        with other pipelines and with the reference path)."""
        self._bypass = True
        for hook in self.hooks:
            hook.enabled = False
        try:
            yield
        finally:
            self._bypass = False
            for hook in self.hooks:
                hook.enabled = True

    # ---- the denoising loop -----------------------------------------------------------------------------
    def denoise(
        self,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
    ) -> DenoiseState:
        if not self.options.cuda_graphs or self._bypass:
            return super().denoise(state, make_step, on_step)
        from ..denoise import StepGraph, graph_key

        key = graph_key(state)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph.run(state, on_step)
        graph, result = StepGraph.first_run(state, make_step, on_step, pool=self._graph_pool())
        self._graphs[key] = graph
        self.stats.captures[str(tuple(state.history.shape))] = graph.capture_s
        logger.info("captured the denoising step in %.2f s (its first step included)", graph.capture_s)
        return result

    # ---- the loop of a scheduler's own step: its denoiser call in CUDA graphs (denoise.CudaGraphCall) ------
    def graphed(self, name: str, fn: Callable[[Tensors], Tensors]) -> Callable[[Tensors], Tensors]:
        if not self.options.cuda_graphs or self._bypass:
            return fn
        from ..denoise import CudaGraphCall

        if name not in self._graphed_calls:
            self._graphed_calls[name] = CudaGraphCall(fn, self.device, pool=self._graph_pool())
        return self._graphed_calls[name]

    def _graph_pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


def _fp8_part(module: torch.nn.Module, device: torch.device) -> None:
    """After each block of the denoiser lands on `device`: its Linear layers in fp8, Q/K/V fused (fp8.py)."""
    from .fp8 import fuse_fp8_projections, quantize_linears

    quantize_linears(module, device=device, quiet=True)
    fuse_fp8_projections(module)
