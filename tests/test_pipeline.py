"""The correctness anchor: in float32 on CPU our images equal diffusers' own pipelines, for the same weights
and the same generator (max abs difference <= 2e-3 on output_type="np")."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline

from pipeline import InvalidInputError, Pipeline, UnsupportedModelError

TOLERANCE = 2e-3


def _ours(folder: Path, tmp_path: Path, **kwargs) -> Pipeline:
    pipe = Pipeline.from_pretrained(
        folder, backend="torch", device="cpu", dtype=torch.float32, cache_dir=tmp_path, **kwargs
    )
    pipe.progress = False
    return pipe


def _theirs(cls: type, folder: Path):
    extra = (
        {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    )
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _both(ours: Pipeline, theirs, their_generator=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    a = ours(generator=torch.Generator().manual_seed(1234), output_type="np", **kwargs).images
    generator = their_generator or torch.Generator().manual_seed(1234)
    b = theirs(generator=generator, output_type="np", **kwargs).images
    return a, b


def _with_scheduler(src: Path, dst: Path, cls_name: str, **config) -> Path:
    """A copy of a model folder whose scheduler is replaced (same weights)."""
    import diffusers

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "scheduler")
    getattr(diffusers, cls_name)(**config).save_pretrained(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls_name]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def test_flux_equals_diffusers(tiny_flux: Path, tmp_path: Path) -> None:
    """A list of prompts, two images each, a non-square size, guidance embedding, dynamic shifting."""
    a, b = _both(
        _ours(tiny_flux, tmp_path),
        _theirs(FluxPipeline, tiny_flux),
        prompt=["a red fox in the snow", "a cat"],
        num_images_per_prompt=2,
        height=64,
        width=48,
        num_inference_steps=4,
        guidance_scale=3.5,
        max_sequence_length=64,
    )
    assert a.shape == b.shape == (4, 64, 48, 3)
    assert np.abs(a - b).max() <= TOLERANCE
    assert np.abs(a[0] - a[1]).max() > 1e-3  # two images per prompt really differ


def test_sd_equals_diffusers_with_negative_prompts(tiny_sd: Path, tmp_path: Path) -> None:
    """PNDM (the SD 1.5 scheduler), classifier-free guidance with negative prompts, batch, non-square."""
    a, b = _both(
        _ours(tiny_sd, tmp_path),
        _theirs(StableDiffusionPipeline, tiny_sd),
        prompt=["a red fox in the snow", "a cat"],
        negative_prompt=["blurry", "a dog"],
        num_images_per_prompt=2,
        height=48,
        width=64,
        num_inference_steps=5,
        guidance_scale=7.5,
    )
    assert a.shape == b.shape == (4, 48, 64, 3)
    assert np.abs(a - b).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("scheduler", "config"),
    [
        (
            "DDIMScheduler",
            {
                "prediction_type": "v_prediction",
                "set_alpha_to_one": False,
                "steps_offset": 1,
                "clip_sample": False,
            },
        ),
        ("EulerDiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}),
    ],
    ids=["ddim-v-prediction", "euler", "dpm-solver-v-prediction"],
)
def test_sd_other_schedulers_equal_diffusers(
    tiny_sd: Path, tmp_path: Path, scheduler: str, config: dict
) -> None:
    folder = _with_scheduler(tiny_sd, tmp_path / "model", scheduler, **SD_BETAS, **config)
    a, b = _both(
        _ours(folder, tmp_path),
        _theirs(StableDiffusionPipeline, folder),
        prompt="a red fox in the snow",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=5.0,
    )
    assert np.abs(a - b).max() <= TOLERANCE


def test_sd_guidance_rescale_equals_diffusers(tiny_sd: Path, tmp_path: Path) -> None:
    """guidance_rescale (diffusers' rescale_noise_cfg) on the device, inside the graph-capturable step."""
    ours, theirs = _ours(tiny_sd, tmp_path), _theirs(StableDiffusionPipeline, tiny_sd)
    request = {
        "prompt": "a red fox",
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "guidance_scale": 9.0,
    }
    a, b = _both(ours, theirs, **request, guidance_rescale=0.7)
    assert np.abs(a - b).max() <= TOLERANCE
    plain = ours(generator=torch.Generator().manual_seed(1234), output_type="np", **request).images
    assert np.abs(a - plain).max() > 10 * TOLERANCE


def test_sd_without_guidance_equals_diffusers(tiny_sd: Path, tmp_path: Path) -> None:
    a, b = _both(
        _ours(tiny_sd, tmp_path),
        _theirs(StableDiffusionPipeline, tiny_sd),
        prompt="a red fox",
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=1.0,
    )
    assert np.abs(a - b).max() <= TOLERANCE


def test_output_types(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = _ours(tiny_sd, tmp_path)
    out = pipe("a fox", height=64, width=48, num_inference_steps=2, seed=5)
    assert [im.size for im in out.images] == [(48, 64)]
    assert out.seed == 5
    assert set(out.timings) == {"text_encoders", "denoise", "vae_decoder", "total"}
    again = pipe("a fox", height=64, width=48, num_inference_steps=2, seed=5, output_type="np").images
    assert np.array_equal(np.asarray(out.images[0]), (again[0] * 255).round().astype("uint8"))
    latents = pipe("a fox", height=64, width=48, num_inference_steps=2, seed=5, output_type="latent").images
    assert tuple(latents.shape) == (1, 4, 8, 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 60}, "multiple of 8"),
        ({"width": 0}, "multiple of 8"),
        ({"num_inference_steps": 0}, "at least 1"),
        ({"num_images_per_prompt": 0}, "at least 1"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"prompt": []}, "non-empty list"),
        ({"negative_prompt": ["a", "b"]}, "negative prompts"),
    ],
)
def test_bad_requests_raise_typed_errors(tiny_sd: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    pipe = _ours(tiny_sd, tmp_path)
    call = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 1, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        pipe(**call)


def test_flux_granularity_is_16(tiny_flux: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="multiple of 16"):
        _ours(tiny_flux, tmp_path)("a fox", height=72, width=64, num_inference_steps=1)


SD_CALL = {"prompt": "a red fox in the snow", "height": 64, "width": 64, "num_inference_steps": 4}


@pytest.mark.parametrize(
    ("scheduler", "config"),
    [
        ("EulerAncestralDiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        ("KDPM2AncestralDiscreteScheduler", {}),
    ],
    ids=["euler-ancestral", "dpm++-2m-sde", "kdpm2-ancestral"],
)
def test_sd_stochastic_schedulers_equal_diffusers(
    tiny_sd: Path, tmp_path: Path, scheduler: str, config: dict
) -> None:
    """The scheduler's own step with the request's generator: the same noise draws as diffusers'."""
    import diffusers

    theirs = _theirs(StableDiffusionPipeline, tiny_sd)
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config, **config)
    ours = _ours(tiny_sd, tmp_path, scheduler=copy.deepcopy(theirs.scheduler))
    a, b = _both(ours, theirs, guidance_scale=5.0, **SD_CALL)
    assert np.abs(a - b).max() <= TOLERANCE
    other = ours(generator=torch.Generator().manual_seed(99), output_type="np", guidance_scale=5.0, **SD_CALL)
    assert np.abs(a - other.images).max() > 1e-2  # the noise really comes from the generator


def test_sd_ddim_with_clip_sample_equals_diffusers(tiny_sd: Path, tmp_path: Path) -> None:
    """DDIM's default clip_sample=True, set on the pipeline as diffusers users do: not linear, so it runs its
    own step; the tables would have been wrong."""
    from diffusers import DDIMScheduler

    theirs = _theirs(StableDiffusionPipeline, tiny_sd)
    theirs.scheduler = DDIMScheduler(**SD_BETAS)
    ours = _ours(tiny_sd, tmp_path)
    ours.scheduler = DDIMScheduler(**SD_BETAS)
    assert ours.scheduler.config.clip_sample
    a, b = _both(ours, theirs, guidance_scale=5.0, **SD_CALL)
    assert np.abs(a - b).max() <= TOLERANCE
    ours.scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False)  # on the tables
    c = ours(generator=torch.Generator().manual_seed(1234), output_type="np", guidance_scale=5.0, **SD_CALL)
    assert np.abs(a - c.images).max() > 1e-2


def test_sd_adopts_an_outdated_scheduler_config_as_diffusers(tiny_sd: Path, tmp_path: Path) -> None:
    """A folder shipping DDIM with steps_offset 0 and clip_sample true (old checkpoints): StableDiffusionPipeline
    loads it with steps_offset=1 and clip_sample=False, and so do we."""
    folder = _with_scheduler(tiny_sd, tmp_path / "model", "DDIMScheduler", **SD_BETAS, steps_offset=0)
    ours = _ours(folder, tmp_path)
    assert (ours.scheduler.config.steps_offset, ours.scheduler.config.clip_sample) == (1, False)
    a, b = _both(ours, _theirs(StableDiffusionPipeline, folder), guidance_scale=5.0, **SD_CALL)
    assert np.abs(a - b).max() <= TOLERANCE
    ours.scheduler = "EulerDiscreteScheduler"  # built from the adopted config
    assert ours.scheduler.config.steps_offset == 1


def test_flux_stochastic_sampling_equals_diffusers(tiny_flux: Path, tmp_path: Path) -> None:
    """FluxPipeline gives its scheduler no generator: its step draws from torch's global generator. Seeded
    and handed to diffusers as the generator, that is one stream, as our request's generator is."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = _theirs(FluxPipeline, tiny_flux)
    theirs.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        theirs.scheduler.config, stochastic_sampling=True
    )
    ours = _ours(tiny_flux, tmp_path, scheduler=copy.deepcopy(theirs.scheduler))
    call = {
        "prompt": "a red fox",
        "height": 48,
        "width": 64,
        "num_inference_steps": 4,
        "max_sequence_length": 32,
    }
    a = ours(generator=torch.Generator().manual_seed(1234), output_type="np", **call).images
    b = theirs(generator=torch.manual_seed(1234), output_type="np", **call).images
    assert np.abs(a - b).max() <= TOLERANCE
    ours.scheduler = "FlowMatchEulerDiscreteScheduler"  # the model's own, deterministic, on tables
    c = ours(generator=torch.Generator().manual_seed(1234), output_type="np", **call).images
    assert np.abs(a - c).max() > 1e-2


def test_the_model_folders_stochastic_scheduler_runs(tiny_sd: Path, tmp_path: Path) -> None:
    folder = _with_scheduler(tiny_sd, tmp_path / "model", "EulerAncestralDiscreteScheduler", **SD_BETAS)
    a, b = _both(
        _ours(folder, tmp_path), _theirs(StableDiffusionPipeline, folder), guidance_scale=1.0, **SD_CALL
    )
    assert np.abs(a - b).max() <= TOLERANCE


def test_choosing_the_scheduler(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = _ours(tiny_sd, tmp_path, scheduler="EulerAncestralDiscreteScheduler")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # from the model's scheduler config
    names = {cls.__name__ for cls in pipe.scheduler.compatibles}
    assert {"PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"} <= names
    with pytest.raises(InvalidInputError, match=r"unknown scheduler 'Euler'.*EulerDiscreteScheduler"):
        pipe.scheduler = "Euler"
    with pytest.raises(InvalidInputError, match="needs torchsde"):
        pipe.scheduler = "DPMSolverSDEScheduler"
    with pytest.raises(InvalidInputError, match="diffusers scheduler"):
        pipe.scheduler = 3
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"  # a refusal changes nothing
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler  # a class: built from the model's scheduler config too
    assert (
        isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.beta_end == SD_BETAS["beta_end"]
    )


def _without_weights(folder: Path, dst: Path) -> Path:
    """A model folder whose UNet weights are gone: loading them would fail with another error."""
    shutil.copytree(folder, dst)
    for weights in (dst / "unet").glob("*.safetensors"):
        weights.unlink()
    return dst


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (
            "EulerAncestral",
            "unknown scheduler 'EulerAncestral' for this model; choose one of DDIMScheduler, ",
        ),
        ("FlowMatchEulerDiscreteScheduler", "unknown scheduler"),
        ("DPMSolverSDEScheduler", "needs torchsde"),
    ],
)
def test_bad_scheduler_is_refused_before_weights_load(
    tiny_sd: Path, tmp_path: Path, scheduler: str, message: str
) -> None:
    folder = _without_weights(tiny_sd, tmp_path / "model")
    with pytest.raises(InvalidInputError, match=message):
        _ours(folder, tmp_path, scheduler=scheduler)


def test_learned_variance_is_refused_before_weights_load(tiny_sd: Path, tmp_path: Path) -> None:
    """DPM-Solver's variance_type="learned*" keeps model_output[:, :3] (DeepFloyd IF: 3 noise + 3 variance
    channels): on a 4-channel UNet it is meaningless, and diffusers' own pipeline fails with a shape error."""
    from diffusers import DPMSolverMultistepScheduler

    folder = _with_scheduler(
        tiny_sd, tmp_path / "model", "DPMSolverMultistepScheduler", **SD_BETAS, variance_type="learned_range"
    )
    folder = _without_weights(folder, tmp_path / "no-weights")
    with pytest.raises(InvalidInputError, match=r"variance_type='learned_range'.*leave variance_type unset"):
        _ours(folder, tmp_path)
    with pytest.raises(InvalidInputError, match="variance_type='learned'"):
        _ours(tiny_sd, tmp_path).scheduler = DPMSolverMultistepScheduler(**SD_BETAS, variance_type="learned")


def test_a_scheduler_that_cannot_step_is_refused_before_weights_load(tiny_sd: Path, tmp_path: Path) -> None:
    """RePaint's step needs an original image and a mask: the dry run finds out, in one line."""
    from diffusers import RePaintScheduler

    folder = _without_weights(tiny_sd, tmp_path / "model")
    with pytest.raises(InvalidInputError, match="RePaintScheduler cannot run with this sd model"):
        _ours(folder, tmp_path, scheduler=RePaintScheduler())


def test_unsupported_family_and_non_model_folder(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"no model_index\.json"):
        Pipeline.from_pretrained(tmp_path, backend="torch", device="cpu")
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyV22Pipeline")))
    with pytest.raises(UnsupportedModelError, match=r"KandinskyV22Pipeline.*StableDiffusionXLPipeline"):
        Pipeline.from_pretrained(folder, backend="torch", device="cpu")


def test_long_prompt_is_truncated_with_a_warning(tiny_sd: Path, tmp_path: Path, caplog) -> None:
    pipe = _ours(tiny_sd, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = pipe("fox " * 200, height=64, width=64, num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert any("token(s) dropped" in r.getMessage() for r in caplog.records)


def test_flux_schnell_equals_diffusers(tiny_flux: Path, tmp_path: Path) -> None:
    """FLUX.1-schnell's shape: no guidance embedding, no dynamic shifting; its defaults (4 steps, guidance 0)."""
    from diffusers import FluxTransformer2DModel

    folder = _with_scheduler(
        tiny_flux,
        tmp_path / "schnell",
        "FlowMatchEulerDiscreteScheduler",
        shift=1.0,
        use_dynamic_shifting=False,
    )
    config = dict(FluxTransformer2DModel.load_config(folder / "transformer"), guidance_embeds=False)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    ours = _ours(folder, tmp_path)
    assert (ours.family.default_steps, ours.family.default_guidance) == (4, 0.0)
    assert "guidance" not in ours.family.stages["transformer"].input_names
    a, b = _both(
        ours,
        _theirs(FluxPipeline, folder),
        prompt="a red fox",
        height=48,
        width=64,
        num_inference_steps=4,
        guidance_scale=0.0,
        max_sequence_length=32,
    )
    assert np.abs(a - b).max() <= TOLERANCE
