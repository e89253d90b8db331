"""The torch backend's options: names, defaults (each with the measurement behind it), and their checks.

Bad values raise InvalidInputError with one line that says what to pass instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from .base import Precision, Specialization, parse_precision

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
    "channels_last",
    "inductor_options",
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
# The VAE on CUDA: its GroupNorms take group_norm.py's split-reduction statistics, in this memory layout.
# Decode, H200, torch 2.11, 2026-12-03 (scripts/vae_bench.py, docs/h200/vae_group_norm.json), torch's GroupNorm
# NCHW / channels-last -> ours NCHW / channels-last: FLUX 1024² bf16 87.8 / 128.7 -> 43.2 / 43.1 ms; SD 512²
# fp16 23.7 / 29.4 -> 20.7 / 15.4 ms; SDXL's float32 VAE at 1024² 116.8 / 165.0 -> 81.5 / 72.6 ms.
VAE_CHANNELS_LAST = True
# Attention on CUDA. "auto": cuDNN's fused attention on Hopper and newer, where it measured 0.41 ms against
# flash attention's 0.78 ms at FLUX-dev 1024x1024's shape on an H100 (relative difference 3e-3;
# the since-removed scripts/gpu_check.py, 2026-11-23); torch's own choice elsewhere. "cudnn-self": cuDNN for
# self-attention, flash attention for cross-attention (no per-shape plans at a new size; attention_kernels.py),
# not measured on a GPU yet, so not the default. "fp8": FLUX's joint attention in float8 through cuDNN's
# sdpa_fp8 (fp8_attention.py; the nvidia-cudnn-frontend package on CUDA), everything else as "cudnn".
ATTENTION_CHOICES = ("auto", "cudnn", "cudnn-self", "flash", "fp8", "default")
# fp8 Linear kernels: torchao's Float8DynamicActivationFloat8WeightConfig (per-row scales) or our own
# torch._scaled_mm module (fp8.py); see fp8.py for which is the default and why.
FP8_KERNELS = ("torchao", "scaled_mm")
SPECIALIZATIONS = (Specialization.NONE, Specialization.EAGER)
# The UNets' ResnetBlock2D as regions too (besides their attention blocks): "on" compiles them in the call that
# meets them, "background" in another process while they run eagerly (background_compile.py), "off" never
# (True/False: on/off). Unset: each family's `compile_resnets_on_cuda` on CUDA with compile on, off elsewhere.
# SD 1.5 512² on the H200 (torch 2.11, 2026-12-03): 0.451 s steady compiled against 0.521 s eager, but their 15
# artifacts make the first call 87 s with "on"; with "background" it stays 18.8 s and they land 99 s later.
RESNET_MODES = ("off", "on", "background")
# `channels_last`: a convolutional denoiser (the UNets) in channels-last memory layout, its region inputs kept
# channels-last. Unset, each family's `channels_last_on_cuda` decides on CUDA; off on the CPU, where the
# reference equality with diffusers is checked in NCHW. Measured on the H200 (torch 2.11, fp16,
# scripts/bench.py and scripts/profile_step.py, 2026-12-02): SD 1.5 512², 50 steps, NCHW spent 0.17 s of a
# 0.64 s call in 5,151 cuDNN layout conversions; channels-last ran 0.52 s steady against 0.61 s. SDXL 1024²,
# 30 steps, whose time is mostly attention and GEMMs, ran 1.36 s channels-last against 1.32 s NCHW.

# Inductor's conv_1x1_as_mm (1x1 convolutions lowered to GEMMs, so cuDNN builds no plan for them): the
# default of SD 1.x/2.x on CUDA (`inductor_options_on_cuda`). H200, torch 2.11, 2026-12-04, scripts/bench.py,
# SD 1.5 512² then 768², each configuration alone in a process, two runs in opposite orders: the first 768² call
# 1.660 / 1.583 s against 1.904 / 1.822 s, steady 0.449 / 0.442 s against 0.455 / 0.453 s, the first call
# 25.4 / 17.3 s against 18.5 / 17.1 s (the 25.4 s: the first process on a fresh machine). A third run, after
# other configurations in its process: 1.817 s for the first 768² call, so processes spread about as much as
# it gains there; steady was better in every run. SDXL 1024² then 896² (one run) lost with it: steady 1.232 s
# against 1.213 s, the first 896² call 1.551 s against 1.398 s.


def inductor_options_for(
    family_defaults: Mapping[str, Any], device: torch.device, user: dict[str, Any]
) -> dict[str, Any]:
    """The regions' Inductor settings: the family's CUDA defaults (on CUDA only), then the user's over them."""
    return (dict(family_defaults) if device.type == "cuda" else {}) | user


def choose_attention(device: torch.device, choice: str) -> str:
    """Set torch's (process-wide) SDPA backend flags for `choice`; returns the backend in use."""
    if device.type != "cuda" and choice == "fp8":
        return choice  # fp8_attention.py's float32 reference
    if device.type != "cuda" or choice == "default":
        return "default"
    if choice == "auto":
        choice = "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "default"
        if choice == "default":
            return choice
    cudnn = choice in ("cudnn", "cudnn-self", "fp8")
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.backends.cuda.enable_flash_sdp(choice == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    described = {
        "cudnn": "cuDNN", "cudnn-self": "cuDNN (cross-attention: flash)", "flash": "flash", "fp8": "cuDNN fp8",
    }  # fmt: skip
    logger.info("attention: %s fused attention", described[choice])
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
    compile_resnets: str | None = None  # one of RESNET_MODES; None: the family's choice on CUDA
    autotune: bool = False
    channels_last: bool | None = None  # None: the family's choice on CUDA, off elsewhere
    # torch._inductor.config settings for the regions, over INDUCTOR_OPTIONS (artifacts keyed apart by them)
    inductor_options: dict[str, Any] = field(default_factory=dict)

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
        if attention == "fp8":
            from .fp8_attention import available

            ok, why = available(device)
            if not ok:
                raise InvalidInputError(f"attention fp8 cannot run here: {why}")
        kernel = options.get("fp8_kernel")
        if kernel is not None and kernel not in FP8_KERNELS:
            raise InvalidInputError(f"fp8_kernel must be one of {', '.join(FP8_KERNELS)}, got {kernel!r}")
        vae = _flag(options, "compile_vae", default=DEFAULT_COMPILE_VAE)
        resnets = options.get("compile_resnets")
        if isinstance(resnets, bool):
            resnets = "on" if resnets else "off"
        if resnets is not None and resnets not in RESNET_MODES:
            raise InvalidInputError(
                f"compile_resnets must be one of {', '.join(RESNET_MODES)} (or true/false), got {resnets!r}"
            )
        autotune = _flag(options, "autotune", default=False)
        channels_last = options.get("channels_last")
        if channels_last is not None:
            channels_last = _flag(options, "channels_last", default=False)
        return cls(
            compile_,
            graphs,
            specialization,
            precision,
            attention,
            kernel,
            vae,
            resnets,
            autotune,
            channels_last,
            _inductor_options(options.get("inductor_options")),
        )


def _inductor_options(value: Any) -> dict[str, Any]:
    """`inductor_options` checked against torch._inductor.config: known names, plain values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(
            f"inductor_options must be a dict of torch._inductor.config settings, got {value!r}"
        )
    import torch._inductor.config as inductor_config

    for name, setting in value.items():
        if not isinstance(name, str) or not hasattr(inductor_config, name):
            raise InvalidInputError(f"inductor_options: torch._inductor.config has no setting {name!r}")
        if not isinstance(setting, bool | int | float | str):
            raise InvalidInputError(
                f"inductor_options: {name} must be a bool, number or string, got {setting!r}"
            )
    return dict(value)


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
