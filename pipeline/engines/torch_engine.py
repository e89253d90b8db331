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
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError
from ..families import Family, StageSpec
from ..families.base import Tensors
from .attention_kernels import flash_cross_attention
from .background_compile import BackgroundCompiler
from .base import Backend, Precision, Specialization
from .compile_cache import INDUCTOR_GROUP, ArtifactStore, load_store, save_store
from .compile_warmup import CompilerWarmup
from .fp8_attention import use_fp8_attention
from .fusion import fuse_projections
from .group_norm import widen_group_norms
from .torch_compile import (
    RESNET_REGIONS,
    CompiledForward,
    RegionCompiler,
    RegionStats,
    configure_dynamo,
    wrap_regions,
)
from .torch_options import (
    AUTOTUNE_OPTIONS,
    INDUCTOR_OPTIONS,
    VAE_CHANNELS_LAST,
    TorchOptions,
    choose_attention,
    inductor_options_for,
)

if TYPE_CHECKING:
    from ..cache import ModelCache
    from ..denoise import DenoiseState, StepGraph

logger = logging.getLogger(__name__)


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
    warmup_s: float | None = None  # the compiler's start-up, done while the model loaded (compile_warmup.py)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        self.options = TorchOptions.parse(device, options)
        super().__init__(family, device, dtype)
        if self.options.attention == "fp8" and not family.fp8_attention:
            raise InvalidInputError(f"attention fp8 is FLUX's joint attention; {family.name} has none")
        self.attention = choose_attention(device, self.options.attention)
        self.flash_cross = self.attention == "cudnn-self"  # cross-attention on flash (attention_kernels.py)
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
        resnets = self.options.compile_resnets
        if resnets is None:
            resnets = family.compile_resnets_on_cuda if device.type == "cuda" else "off"
        self.compile_resnets = resnets if self.options.compile else "off"

        source = family.source
        self.fp8_kernel: str | None = None
        if self.options.precision is Precision.FP8:
            from .fp8 import DEFAULT_KERNEL

            self.fp8_kernel = self.options.fp8_kernel or DEFAULT_KERNEL
        self.tag = f"attn-{self.attention}" + (f"-fp8-{self.fp8_kernel}" if self.fp8_kernel else "")
        if self.options.autotune:
            self.tag += "-autotune"  # its artifacts hold other kernels: never mixed with the default ones
        self.inductor_options = inductor_options_for(
            family.inductor_options_on_cuda, device, self.options.inductor_options
        )
        if self.inductor_options:  # the same for Inductor settings other than the defaults
            settings = json.dumps(self.inductor_options, sort_keys=True)
            self.tag += "-ind" + hashlib.sha256(settings.encode()).hexdigest()[:8]
        store, warmup = None, None
        if self.options.compile:  # the cache first: whether a compile is coming decides the warm-up
            configure_dynamo()
            store = self._load_compile_cache()
            if device.type == "cuda" and not self._has_regions(store):
                warmup = CompilerWarmup(device, dtype)
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
            if self.flash_cross:
                flash_cross_attention(denoiser)
            if self.fp8_kernel is not None:
                from .fp8 import quantize_linears

                quantize_linears(denoiser, kernel=self.fp8_kernel)
        if self.attention == "fp8":
            use_fp8_attention(denoiser)
        if device.type == "cuda" and "vae" in modules:
            widen_group_norms(modules["vae"])  # its GroupNorms' statistics from split reductions
            if VAE_CHANNELS_LAST:
                modules["vae"].to(memory_format=torch.channels_last)
        wanted = self.options.channels_last
        if wanted is None:
            wanted = device.type == "cuda" and family.channels_last_on_cuda
        self.channels_last = wanted and _has_convolutions(denoiser)
        if self.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if store is not None:
            self._prepare_compile(store, denoiser, modules.get("vae"))
        if warmup is not None:
            self.stats.warmup_s = warmup.join()
        for stage in family.stages.values():
            self.engines[stage.name] = TorchEngine(stage, modules[stage.component])

    # ---- compile --------------------------------------------------------------------------------------
    def _has_regions(self, store: ArtifactStore) -> bool:
        """Whether the cache holds region artifacts compiled with these options (else a compile is coming)."""
        mode = "static" if self.options.specialization is Specialization.EAGER else "dyn"
        return any(group.endswith(f"-{mode}-{self.tag}") for group in store.groups())

    def _prepare_compile(
        self, store: ArtifactStore, denoiser: torch.nn.Module, vae: torch.nn.Module | None
    ) -> None:
        inductor = dict(INDUCTOR_OPTIONS) | (AUTOTUNE_OPTIONS if self.options.autotune else {})
        inductor |= self.inductor_options
        self.compiler = RegionCompiler(
            store, specialization=self.options.specialization, options=inductor, tag=self.tag
        )
        self.stats.regions = self.compiler.stats
        extra = RESNET_REGIONS if self.compile_resnets != "off" else ()
        if self.compile_resnets == "background":
            self.compiler.background = BackgroundCompiler(
                device=self.device,
                dynamic=self.compiler.dynamic,
                options=inductor,
                cache_path=self.model_cache.runtime_cache_path,
                platform_key=self.model_cache.platform_key,
                meta=self._cache_meta(),
            )
            self.compiler.deferred = frozenset(RESNET_REGIONS)
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
        return save_store(
            store, self.model_cache.runtime_cache_path, self.model_cache.platform_key, self._cache_meta()
        )

    def _cache_meta(self) -> dict[str, Any]:
        return {"kind": "torch-compile", "attention": self.attention, "fp8_kernel": self.fp8_kernel}

    # ---- regions compiled in the background (compile_resnets="background") --------------------------------
    @property
    def _background(self) -> BackgroundCompiler | None:
        return None if self.compiler is None else self.compiler.background

    def _swap_in(self) -> None:
        """Serve what the background compiler finished; captured graphs ran those regions eagerly, so they
        are captured again (once per finished batch: one call pays a capture, like a new size)."""
        if self.compiler is not None and self.compiler.swap_in():
            self._graphs.clear()
            self._graphed_calls.clear()
            # their memory pool goes with them: capturing into its handle again trips the allocator's
            # assert (use_count > 0, torch 2.11), so the next capture takes a fresh pool
            self._pool = None
            logger.info("background-compiled regions swapped in; the next call captures its graphs again")

    def between_calls(self) -> None:
        self._swap_in()
        if self._background is not None:
            self._background.launch()  # what this call's regions submitted

    @property
    def background_busy(self) -> bool:
        """Whether regions are still compiling (or queued) in the background."""
        return self._background is not None and self._background.busy

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait until the regions compiling in the background are done and served (or `timeout` seconds);
        returns whether none is left. For benchmarks and prewarm.py; serving never waits."""
        background = self._background
        deadline = None if timeout is None else time.monotonic() + timeout
        while background is not None and background.busy:
            background.launch()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not background.wait(left):
                break
            self._swap_in()
        return not self.background_busy

    def stop_background(self) -> None:
        """Kill the background compiles (what already landed in the cache file stays there)."""
        if self._background is not None:
            self._background.close(stop=True)
            self.compiler.background = None

    def close(self) -> None:
        if self._background is not None:
            self._swap_in()  # what finished goes into this process's save too
            self._background.close()  # the rest finishes into the cache file by itself
            self.compiler.background = None
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
    @property
    def _graphing(self) -> bool:
        """Whether the loop runs in CUDA graphs now: the option on, and not inside `uncompiled()`."""
        return self.options.cuda_graphs and not self._bypass

    def step_capacity(self, steps: int, row_bytes: int) -> int:
        if not self._graphing:
            return steps
        from ..denoise import step_capacity

        # padding up to 1% of the GPU's memory (FLUX 1024², batch 4, 64 steps: 0.27 GB)
        budget = torch.cuda.get_device_properties(self.device).total_memory // 100
        return step_capacity(steps, row_bytes, budget)

    def denoise(
        self,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
    ) -> DenoiseState:
        if not self._graphing:
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
        if not self._graphing:
            return fn
        from ..denoise import CudaGraphCall

        if name not in self._graphed_calls:
            self._graphed_calls[name] = CudaGraphCall(fn, self.device, pool=self._graph_pool())
        return self._graphed_calls[name]

    def _graph_pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


def _has_convolutions(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def _fp8_part(module: torch.nn.Module, device: torch.device) -> None:
    """After each block of the denoiser lands on `device`: its Linear layers in fp8, Q/K/V fused (fp8.py)."""
    from .fp8 import fuse_fp8_projections, quantize_linears

    quantize_linears(module, device=device, quiet=True)
    fuse_fp8_projections(module)
