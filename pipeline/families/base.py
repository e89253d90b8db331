"""What a model family is: its stages (names, tensors, dynamic dims) and its pipeline math.

A family describes each stage once. Export reads `StageSpec` for input/output names and dynamic axes, the
TensorRT-RTX builder reads `Family.profile()` for optimization profiles, the torch engine reads the dims to
mark dynamic shapes, and the pipeline binds tensors by these names. Nothing about a stage's shapes is
written anywhere else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..loading import ModelSource

Tensors = dict[str, torch.Tensor]

# dtype names used in specs: "model" means the stage's compute dtype (fp32/fp16/bf16), the rest are fixed.
FIXED_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. `shape` holds ints (fixed) and strings (dynamic dim names)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "model"

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype == "model" else FIXED_DTYPES[self.dtype]

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class DimRange:
    """Legal values of one dynamic dim: TensorRT's min/opt/max."""

    min: int
    opt: int
    max: int

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class ShapeRange:
    """The range of requests an engine or compiled graph must serve (pixels, images per call, text)."""

    min_size: tuple[int, int] = (512, 512)  # (height, width)
    opt_size: tuple[int, int] = (1024, 1024)
    max_size: tuple[int, int] = (1024, 1024)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1

    def __post_init__(self) -> None:
        for i in range(2):
            if not self.min_size[i] <= self.opt_size[i] <= self.max_size[i]:
                raise ValueError(f"sizes must satisfy min <= opt <= max, got {self}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batches must satisfy 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline: the diffusers component it runs and its named tensors.

    `forward(module, inputs)` calls the diffusers module with the named inputs exactly as diffusers'
    pipelines do and returns the named outputs. Export wraps the same function, so the ONNX graph and the
    torch engine compute the same thing.
    """

    name: str
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    forward: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Tensors] = field(
        repr=False, compare=False
    )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dim_names(self) -> list[str]:
        names: list[str] = []
        for t in (*self.inputs, *self.outputs):
            for d in t.shape:
                if isinstance(d, str) and d not in names:
                    names.append(d)
        return names

    def shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input for the given dynamic-dim values."""
        return {t.name: t.concrete(dims) for t in self.inputs}

    def profile(self, ranges: Mapping[str, DimRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shape per input, for a TensorRT optimization profile."""
        out = {}
        for t in self.inputs:
            out[t.name] = tuple(
                t.concrete({k: getattr(r, which) for k, r in ranges.items()})
                for which in ("min", "opt", "max")
            )
        return out

    def example_inputs(
        self,
        dims: Mapping[str, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        int_high: int = 100,
    ) -> Tensors:
        """Random inputs of the right names, shapes and dtypes (for export, builds and tests)."""
        out: Tensors = {}
        for t in self.inputs:
            shape = t.concrete(dims)
            tdtype = t.torch_dtype(dtype)
            if tdtype.is_floating_point:
                out[t.name] = torch.randn(shape, generator=generator).to(device=device, dtype=tdtype)
            else:
                out[t.name] = torch.randint(0, int_high, shape, generator=generator).to(
                    device=device, dtype=tdtype
                )
        return out


def vae_decode(module: torch.nn.Module, x: Mapping[str, torch.Tensor]) -> Tensors:
    """The `vae_decoder` stage of every family: AutoencoderKL.decode(latent)."""
    return {"sample": module.decode(x["latent"], return_dict=False)[0]}


def vae_decoder_stage(vae_config: Mapping[str, Any]) -> StageSpec:
    return StageSpec(
        "vae_decoder",
        "vae",
        (TensorSpec("latent", ("batch", vae_config["latent_channels"], "latent_height", "latent_width")),),
        (TensorSpec("sample", ("batch", vae_config.get("out_channels", 3), "image_height", "image_width")),),
        vae_decode,
    )


def classifier_free_guidance(
    output: torch.Tensor, guidance_scale: torch.Tensor, guidance_rescale: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' classifier-free guidance over a [uncond, cond] batch, then its `rescale_noise_cfg`
    (Lin et al. 2023, section 3.4) by `guidance_rescale` where that is > 0.

    Both factors are device tensors and the choice is a `torch.where`, not a branch: no host sync, so the
    step stays capturable in a CUDA graph whatever the factors are.
    """
    uncond, cond = output.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale is None:
        return guided
    dims = list(range(1, guided.ndim))
    std_text = cond.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guidance_rescale * (guided * (std_text / std_cfg)) + (1 - guidance_rescale) * guided
    return torch.where(guidance_rescale > 0, rescaled, guided)


class Family(ABC):
    """A model family: its stages plus the math diffusers' own pipeline does around them.

    Subclasses are built from a `ModelSource` (configs, tokenizers, scheduler; no weights) and describe:
    how prompts become conditioning tensors, how initial latents are drawn, how the denoiser is called each
    step, and how latents become images. The `Pipeline` calls these in order.
    """

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    denoiser: ClassVar[str]  # stage name of the denoiser
    scheduler_class: ClassVar[str]  # the scheduler of the reference checkpoint: --help offers its compatibles
    default_cuda_dtype: ClassVar[torch.dtype] = torch.float16  # the weights' dtype on a GPU unless asked
    # diffusers' pipeline calls scheduler.set_begin_index(0) (FLUX does; SD's pipelines do not)
    schedule_begin_index: ClassVar[bool] = False
    # guidance_scale is a distilled guidance input of the denoiser (FLUX.1-dev), not classifier-free guidance
    distilled_guidance: ClassVar[bool] = False
    # the most text tokens `max_sequence_length` may ask for (None: the family has no such argument)
    max_text_tokens: ClassVar[int | None] = None
    # `Pipeline.__call__` arguments beyond the common ones that this family honours (diffusers' names). The
    # pipeline passes them to `encode_prompt` and `denoiser_conditioning`, and refuses the others.
    call_options: ClassVar[frozenset[str]] = frozenset()
    # Linear layers of the denoiser that fp8 engines quantize (fnmatch patterns on module names): by default
    # all of them; families name their repeated blocks, keeping embedders and output projections precise.
    fp8_modules: ClassVar[tuple[str, ...]] = ("*",)
    # torch fp8: the denoiser can be quantized and its Q/K/V fused block by block while it loads (its
    # attentions read fused layers by their `fused_projections` flag; UNets switch processor classes instead)
    fp8_while_loading: ClassVar[bool] = False
    # the denoiser's attention is FLUX's joint attention (diffusers' FluxAttention): the torch backend's
    # attention="fp8" runs it in float8 (fp8_attention.py)
    fp8_attention: ClassVar[bool] = False
    # torch on CUDA: the denoiser in channels-last memory layout unless the user says otherwise (the torch
    # backend's `channels_last` option); set per family by measurement (torch_options.py)
    channels_last_on_cuda: ClassVar[bool] = False
    # the torch backend's `compile_resnets` on CUDA when unset: "off", "on" or "background" (torch_options.py)
    compile_resnets_on_cuda: ClassVar[str] = "off"
    # torch on CUDA: torch._inductor.config settings for the regions unless the user's `inductor_options` say
    # otherwise (theirs win name by name); set per family by measurement (torch_options.py)
    inductor_options_on_cuda: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.stages: dict[str, StageSpec] = self._build_stages()

    # ---- shapes -----------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.source.configs["vae"]["block_out_channels"]) - 1)

    @property
    def clip_length(self) -> int:
        """Token length of the CLIP text encoder (`text_encoder`), which every family has."""
        return int(self.source.configs["text_encoder"]["max_position_embeddings"])

    @property
    @abstractmethod
    def granularity(self) -> int:
        """Height and width must be multiples of this (pixels)."""

    @property
    def default_size(self) -> int:
        vae = self.source.configs["vae"]
        return int(vae.get("sample_size", 512))

    @property
    @abstractmethod
    def default_steps(self) -> int: ...

    def request_defaults(
        self,
        height: int | None,
        width: int | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
    ) -> tuple[Any, Any, Any, Any]:
        """(height, width, steps, guidance) with the model's defaults for what is None: its native size,
        the steps and guidance its model card gives. Values are not checked here (`check_request` does)."""
        return (
            self.default_size if height is None else height,
            self.default_size if width is None else width,
            self.default_steps if num_inference_steps is None else num_inference_steps,
            self.default_guidance if guidance_scale is None else guidance_scale,
        )

    def uses_negative_prompt(self, guidance_scale: float) -> bool:
        """Whether a negative prompt changes the image at this guidance scale (classifier-free guidance)."""
        return False

    @property
    @abstractmethod
    def default_guidance(self) -> float: ...

    @abstractmethod
    def _build_stages(self) -> dict[str, StageSpec]: ...

    @abstractmethod
    def dims(self, height: int, width: int, batch: int) -> dict[str, int]:
        """Dynamic-dim values of every stage for one request (batch = images per call)."""

    @abstractmethod
    def dim_ranges(self, shape_range: ShapeRange) -> dict[str, DimRange]:
        """Ranges of every dynamic dim for a requested range."""

    # ---- dtypes -----------------------------------------------------------------------------------------
    def component_dtype(self, component: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype of a component's weights and of its stage's "model" tensors when the pipeline runs in
        `dtype`. The one place that decides: the torch backend loads with it, the export traces with it, the
        pipeline casts stage inputs to it. Most families run every component in `dtype`."""
        return dtype

    def stage_dtype(self, stage: str, dtype: torch.dtype) -> torch.dtype:
        return self.component_dtype(self.stages[stage].component, dtype)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse call options this family does not honour (given = not None) and bad values."""
        unknown = sorted(set(options) - self.call_options)
        if unknown:
            raise InvalidInputError(
                f"{', '.join(unknown)}: not used by {self.name} models"
                + (f" (they take {', '.join(sorted(self.call_options))})" if self.call_options else "")
            )
        rescale = options.get("guidance_rescale")
        if rescale is not None and not (isinstance(rescale, int | float) and 0.0 <= rescale <= 1.0):
            raise InvalidInputError(f"guidance_rescale must be a number from 0 to 1, got {rescale!r}")

    def profile(self, stage: str, shape_range: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
        return self.stages[stage].profile(self.dim_ranges(shape_range))

    # ---- pipeline math (implemented per family) -----------------------------------------------------------
    @abstractmethod
    def encode_prompt(
        self,
        run: Callable[[str, Tensors], Tensors],
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        **kwargs: Any,
    ) -> Tensors:
        """Text conditioning for the denoiser, named as the denoiser's inputs, already repeated per image."""

    @abstractmethod
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the initial noise, drawn as diffusers draws it (before any packing)."""

    @abstractmethod
    def pack_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Initial noise -> the latents the denoiser sees."""

    def adopt_scheduler(self, scheduler: Any) -> Any:
        """The scheduler as the family's diffusers pipeline adopts one given at construction (from the model
        folder or `from_pretrained(scheduler=...)`; not one assigned later). Returns a copy where it changes."""
        return scheduler

    @abstractmethod
    def schedule_kwargs(self, height: int, width: int, num_inference_steps: int) -> dict[str, Any]:
        """Extra arguments to the scheduler's `set_timesteps` (FLUX: sigmas and mu)."""

    @abstractmethod
    def denoiser_conditioning(
        self, text: Tensors, height: int, width: int, batch: int, guidance_scale: float, **kwargs: Any
    ) -> Tensors:
        """Every denoiser input that stays the same through the loop (text, ids, guidance). `kwargs` are
        the call options (`call_options`) the request gave."""

    @abstractmethod
    def denoiser_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Tensors) -> Tensors:
        """Inputs of the denoiser stage for one step; no host sync, no data-dependent branching."""

    @abstractmethod
    def guide(
        self,
        output: torch.Tensor,
        guidance_scale: torch.Tensor,
        batch: int,
        guidance_rescale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output -> the model output the scheduler sees (classifier-free guidance where the
        denoiser ran on 2 x batch: [uncond, cond]). `guidance_scale` and `guidance_rescale` are device
        tensors; no host sync."""

    @abstractmethod
    def timestep_values(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Scheduler timesteps -> the value the denoiser is given, rounded as diffusers rounds it."""

    @abstractmethod
    def decoder_input(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents -> the VAE decoder's `latent` input (unpacked, unscaled)."""
