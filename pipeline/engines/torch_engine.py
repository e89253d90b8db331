"""The torch backend: each stage is the diffusers module itself, made fast three ways.

1. Compiled stages: regional torch.compile over the denoiser's repeated blocks, with adaptive shape
   specialization (torch_compile.py); the VAE decoder's resnets too where COMPILE_VAE is set (measured: not
   worth its compile time, see below).
2. A CUDA graph of the whole denoising step (denoiser + guidance + schedule update), captured once per shape
   over static buffers and replayed for every step: no host sync, no per-kernel launch cost in the loop.
3. A persistent compile cache: Inductor's artifacts (torch.compiler.save_cache_artifacts) in the model's one
   runtime cache file per platform (pipeline/cache.py: locked, atomic, validated), loaded at start.

Options (same names as the rtx backend): compile, cuda_graphs, specialization, precision.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError
from ..families import Family, StageSpec
from .base import Backend, Precision, Specialization
from .torch_compile import GPU_WORK_LOCK, Regions, ShapeKey, Variant, configure_dynamo

if TYPE_CHECKING:
    from ..cache import ModelCache
    from ..denoise import DenoiseState

logger = logging.getLogger(__name__)

OPTIONS = ("compile", "cuda_graphs", "specialization", "precision")
_PLUMBING = ("cache_dir", "model_cache")  # passed by the pipeline, not by users
# Default Inductor mode: the large GEMMs go to cuBLAS either way, and max-autotune's GEMM search costs
# minutes per shape; Inductor's own CUDA graphs stay off (we capture the whole step ourselves).
COMPILE_KWARGS: dict[str, Any] = {"fullgraph": True}
CPU_COMPILE_KWARGS: dict[str, Any] = {"fullgraph": True}
# The VAE decoder stays eager: on an H100 (FLUX-dev, 512x512, 2026-11-24, scripts/bench.py) compiling it took
# 42-45 s of a 59 s first call and its dynamic-shape graphs mostly missed the persistent cache, for a decode
# of 0.018 s compiled vs 0.024 s eager. Set True to compile it anyway.
COMPILE_VAE = False
# Shape specialization on the torch backend: "none" by default, measured. On an H100 (FLUX-dev, 2026-11-23,
# scripts/gpu_check.py) generic dynamic-shape kernels ran 1024x1024 in 3.80 s and specialized ones in 3.83 s,
# 512x512 in 1.209 s both; "eager" blocks 9-24 s per new shape, and "lazy" compiles in a thread that competes
# for the CPU with the request being served (dynamo tracing is not thread-safe: calls made while it traces
# run eager). Both stay available as options.
DEFAULT_SPECIALIZATION = Specialization.NONE
# Attention kernels on CUDA. "auto": cuDNN's fused attention on Hopper and newer, where it measured 0.41 ms
# against flash attention's 0.78 ms at FLUX-dev 1024x1024's shape on an H100 (relative difference 3e-3;
# scripts/gpu_check.py, 2026-11-23); torch's own choice elsewhere. "cudnn" forces it; None never touches it.
ATTENTION: str | None = "auto"


def _choose_attention(device: torch.device) -> None:
    if device.type != "cuda" or ATTENTION is None:
        return
    if ATTENTION == "auto" and torch.cuda.get_device_capability(device) < (9, 0):
        return
    # process-wide: torch's SDPA flags are global, and must not change between compile and capture
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    logger.info("attention: cuDNN fused attention (faster on this GPU than flash attention)")


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend's options, checked."""

    compile: bool
    cuda_graphs: bool
    specialization: Specialization
    precision: Precision | None

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
        spec = options.get("specialization") or DEFAULT_SPECIALIZATION
        try:
            specialization = Specialization(spec)
        except ValueError:
            raise InvalidInputError(
                f"specialization must be one of {', '.join(s.value for s in Specialization)}, got {spec!r}"
            ) from None
        precision = None
        if options.get("precision") is not None:
            try:
                precision = Precision(options["precision"])
            except ValueError:
                raise InvalidInputError(
                    f"precision must be one of {', '.join(p.value for p in Precision)}, got {options['precision']!r}"
                ) from None
        if precision is Precision.FP8:
            from .fp8 import fp8_supported

            ok, why = fp8_supported(device)
            if not ok:
                raise InvalidInputError(f"precision fp8 cannot run here: {why}; use --precision bf16")
        return cls(compile_, graphs, specialization, precision)


def _flag(options: dict[str, Any], name: str, default: bool) -> bool:
    value = options.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInputError(f"option {name} must be true or false, got {value!r}")
    return value


class TorchEngine:
    """One stage: a diffusers/transformers module called as `engine(**inputs) -> {name: tensor}`.

    With `regions`, the call runs through the compiled regions in the variant chosen for the input shapes.
    """

    def __init__(self, stage: StageSpec, module: torch.nn.Module, regions: Regions | None = None) -> None:
        self.stage = stage
        self.module = module
        self.regions = regions

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.regions is None:
            return self.stage.forward(self.module, inputs)
        return self.regions.run(inputs, lambda x: self.stage.forward(self.module, x))


@dataclass
class _Graph:
    """One captured denoising step over static buffers."""

    state: DenoiseState
    graph: torch.cuda.CUDAGraph
    variant: Variant | None
    denoiser_key: ShapeKey | None

    def load(self, state: DenoiseState) -> None:
        self.state.load(state)


@dataclass
class TorchStats:
    """What the backend spent on compiling and capturing, and what the cache gave."""

    cache_loaded_bytes: int = 0
    cache_load_s: float = 0.0
    cache_artifacts: int = 0
    captures: dict[str, float] = field(default_factory=dict)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, **options: Any) -> None:
        self.options = TorchOptions.parse(device, options)
        if self.options.precision is not None:
            dtype = self.options.precision.dtype
        super().__init__(family, device, dtype)
        _choose_attention(device)
        self.stats = TorchStats()
        from ..cache import ModelCache

        self.model_cache: ModelCache = options.get("model_cache") or ModelCache.for_model(
            family.source, "torch", device, options.get("cache_dir")
        )
        self.regions: dict[str, Regions] = {}
        self._loaded_payload: bytes | None = None
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._pool: Any = None
        self._bypass = False

        source = family.source
        modules: dict[str, torch.nn.Module] = {}
        for stage in family.stages.values():
            if stage.component not in modules:
                component_dtype = family.component_dtype(stage.component, dtype)  # SDXL: fp32 VAE under fp16
                modules[stage.component] = source.load_component(stage.component, component_dtype, device)
        self.modules = modules
        denoiser = family.stages[family.denoiser].component
        if self.options.precision is Precision.FP8:
            from .fp8 import quantize_linears

            quantize_linears(modules[denoiser])
        if self.options.compile:
            self._prepare_compile(modules, denoiser)
        for stage in family.stages.values():
            module = modules[stage.component]
            regions = self.regions.get(stage.component) if self.options.compile else None
            self.engines[stage.name] = TorchEngine(stage, module, regions)

    # ---- compile --------------------------------------------------------------------------------------
    def _prepare_compile(self, modules: dict[str, torch.nn.Module], denoiser: str) -> None:
        configure_dynamo()
        self._load_compile_cache()
        cuda = self.device.type == "cuda"
        kwargs = COMPILE_KWARGS if cuda else CPU_COMPILE_KWARGS
        den = modules[denoiser]
        if hasattr(den, "fuse_qkv_projections") and self.options.precision is not Precision.FP8:
            with contextlib.suppress(Exception):  # not every attention processor can fuse
                den.fuse_qkv_projections()
        self.regions[denoiser] = Regions(den, self.options.specialization, kwargs)
        if "vae" in modules:
            vae = modules["vae"]
            if cuda:
                vae.to(memory_format=torch.channels_last)
            if COMPILE_VAE:  # the decoder runs once per image: generic kernels only, no compile per shape
                self.regions["vae"] = Regions(vae.decoder, Specialization.NONE, kwargs)
        logger.info(
            "torch.compile: %d denoiser regions, %d VAE decoder regions, specialization %s",
            self.regions[denoiser].count,
            self.regions["vae"].count if "vae" in self.regions else 0,
            self.options.specialization.value,
        )

    def _load_compile_cache(self) -> None:
        from ..cache import load_blob, resolve_runtime_cache

        path = resolve_runtime_cache(self.model_cache)
        if path is None:
            logger.info("no compile cache yet for %s; compiling from scratch", self.model_cache.model_key)
            return
        start = time.perf_counter()
        payload = load_blob(path, self.model_cache.platform_key)
        if payload is None:
            return
        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as e:  # an unreadable cache is a miss, never a crash
            logger.warning("ignoring compile cache %s: %s; a fresh one will be saved", path, e)
            return
        self._loaded_payload = payload
        self.stats.cache_loaded_bytes = len(payload)
        self.stats.cache_load_s = time.perf_counter() - start
        self.stats.cache_artifacts = _artifact_count(info)
        logger.info(
            "compile cache %s: %d artifacts, %.1f MB loaded in %.2f s",
            path,
            self.stats.cache_artifacts,
            len(payload) / 1e6,
            self.stats.cache_load_s,
        )

    def save_compile_cache(self) -> bool:
        """Write what was compiled into the model's cache file. Returns whether a file was written."""
        from ..cache import save_blob, tool_versions

        for regions in self.regions.values():
            regions.wait()
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        data, info = saved
        if not data or data == self._loaded_payload:
            return False
        ok = save_blob(
            self.model_cache.runtime_cache_path,
            data,
            self.model_cache.platform_key,
            tools=tool_versions("torch"),
            meta={"kind": "torch-compile", "artifacts": _artifact_count(info)},
        )
        if ok:
            self._loaded_payload = data
            logger.info(
                "saved compile cache %s (%.1f MB)", self.model_cache.runtime_cache_path, len(data) / 1e6
            )
        return ok

    def close(self) -> None:
        if self.options.compile:
            self.save_compile_cache()

    def describe(self) -> str:
        o = self.options
        parts = [
            "compiled" if o.compile else "eager",
            "cuda graphs" if o.cuda_graphs else "no graphs",
            f"specialization {o.specialization.value}" if o.compile else "",
            f"precision {o.precision.value}" if o.precision else "",
        ]
        return f"torch ({', '.join(p for p in parts if p)})"

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Inside, the modules run eagerly and the loop without CUDA graphs, whatever the options (to compare
        with other pipelines and with the reference path)."""
        saved = {
            name: engine.regions for name, engine in self.engines.items() if isinstance(engine, TorchEngine)
        }
        self._bypass = True
        try:
            for engine in self.engines.values():
                if isinstance(engine, TorchEngine):
                    engine.regions = None
            yield
        finally:
            self._bypass = False
            for name, regions in saved.items():
                self.engines[name].regions = regions  # type: ignore[attr-defined]

    # ---- the denoising loop -----------------------------------------------------------------------------
    def denoise(
        self,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
    ) -> DenoiseState:
        if not self.options.cuda_graphs or self._bypass:
            result = super().denoise(state, make_step, on_step)
        else:
            graph = self._graph_for(state, make_step)
            graph.load(state)
            for _ in range(state.num_steps):
                graph.graph.replay()
                on_step()
            result = graph.state
        regions = self._denoiser_regions()
        if regions is not None:
            regions.start_pending()  # lazy specialization: compile in the background from now on
        return result

    def _graph_for(
        self, state: DenoiseState, make_step: Callable[[DenoiseState], Callable[[], None]]
    ) -> _Graph:
        key = _graph_key(state)
        graph = self._graphs.get(key)
        regions = self._denoiser_regions()
        if graph is not None and regions is not None and graph.denoiser_key is not None:
            if graph.variant is not Variant.SPECIAL and regions.is_special(graph.denoiser_key):
                logger.info("swapping in the shape-specialized step graph")
                graph = None  # specialized kernels became ready: recapture with them
        if graph is None:
            graph = self._capture(state, make_step)
            self._graphs[key] = graph
        return graph

    def _denoiser_regions(self) -> Regions | None:
        engine = self.engines.get(self.family.denoiser)
        return engine.regions if isinstance(engine, TorchEngine) else None

    def _capture(
        self, state: DenoiseState, make_step: Callable[[DenoiseState], Callable[[], None]]
    ) -> _Graph:
        start = time.perf_counter()
        static = state.clone()
        step = make_step(static)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up: compile, autotune, cuBLAS workspaces, outside the graph
            for _ in range(2):
                static.index.zero_()
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        static.index.zero_()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # no background specialization may launch GPU work while the capture is under way
        with GPU_WORK_LOCK, torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            step()
        regions = self._denoiser_regions()
        key, variant = regions.last if regions is not None and regions.last else (None, None)
        seconds = time.perf_counter() - start
        self.stats.captures[f"{tuple(state.history.shape)} {variant or 'eager'}"] = seconds
        logger.info("captured the denoising step (%s kernels) in %.1f s", variant or "eager", seconds)
        return _Graph(static, graph, variant, key)

    def wait_for_specialization(self) -> None:
        """Block until background shape specializations finish (benchmarks, tests)."""
        for regions in self.regions.values():
            regions.wait()


def _graph_key(state: DenoiseState) -> tuple[Any, ...]:
    """Shapes and dtypes of every buffer the step reads or writes: one captured graph per key. Values
    (noise, text embeddings, guidance scale, schedule) are copied into the graph's buffers per call."""
    return tuple((name, tuple(t.shape), t.dtype) for name, t in state.buffers().items())


def _artifact_count(info: Any) -> int:
    if info is None:
        return 0
    artifacts = getattr(info, "artifacts", None)
    if isinstance(artifacts, dict):
        return sum(len(v) for v in artifacts.values())
    return 0
