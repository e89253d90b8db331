"""The correctness anchor: in float32 on CPU our images equal diffusers' own pipelines, for the same weights
and the same generator (max abs difference <= 2e-3 on output_type="np")."""

from __future__ import annotations

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


def _ours(folder: Path, tmp_path: Path) -> Pipeline:
    pipe = Pipeline.from_pretrained(
        folder, backend="torch", device="cpu", dtype=torch.float32, cache_dir=tmp_path
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


def _both(ours: Pipeline, theirs, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    a = ours(generator=torch.Generator().manual_seed(1234), output_type="np", **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1234), output_type="np", **kwargs).images
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


def test_stochastic_scheduler_is_refused(tiny_sd: Path, tmp_path: Path) -> None:
    folder = _with_scheduler(tiny_sd, tmp_path / "model", "EulerAncestralDiscreteScheduler", **SD_BETAS)
    with pytest.raises(UnsupportedModelError, match="fresh noise"):
        _ours(folder, tmp_path)("a fox", height=64, width=64, num_inference_steps=2)


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
    assert any("truncated" in r.getMessage() for r in caplog.records)


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
