"""scripts/bench.py: diffusers' own pipeline as the reference, eager and after its regional compile, on the
modules our eager configuration loaded (measured together with it, whose images every figure is compared with)."""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import numpy as np
import torch
from bench_results import (
    LABELS,
    OURS,
    ConfigResult,
    Setup,
    Status,
    call_diffusers,
    call_ours,
    final_latents,
    finish,
    free_memory,
    fresh_compile_caches,
    max_abs_diff,
    peak_memory_gib,
    reset_peak_memory,
    skipped,
)

from pipeline import Pipeline
from pipeline.engines.group_norm import restore_group_norms

logger = logging.getLogger("bench")

DIFFUSERS_CONFIGS = ("diffusers_eager", "diffusers_compiled")


def build_diffusers_pipeline(pipe: Pipeline) -> Any:
    """diffusers' own pipeline class around the modules `pipe` already loaded (no second load): tokenizers
    and a copy of the scheduler from the model folder, the pipeline options of its model_index.json
    (SDXL: force_zeros_for_empty_prompt), no safety checker, no watermark (ours adds none).

    A module ours runs in another dtype than the pipeline's (SDXL's VAE, upcast to float32 under fp16) is
    given to diffusers as a copy in the pipeline's dtype: diffusers upcasts it itself, per call, as it does.
    The VAE goes back to diffusers' stock form (torch's GroupNorm kernel, NCHW; engines/group_norm.py)."""
    import diffusers

    pipeline_cls = getattr(diffusers, pipe.source.pipeline_class)
    modules: dict[str, torch.nn.Module] = {}
    for engine in pipe.backend.engines.values():
        component, module = engine.stage.component, engine.module  # type: ignore[attr-defined]
        if pipe.family.component_dtype(component, pipe.dtype) != pipe.dtype:
            module = copy.deepcopy(module).to(pipe.dtype)
        if component == "vae":  # diffusers' stock VAE: torch's GroupNorm, NCHW (ours runs after, reloaded)
            restore_group_norms(module)
            module.to(memory_format=torch.contiguous_format)
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
