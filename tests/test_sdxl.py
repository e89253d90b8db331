"""Stable Diffusion XL: in float32 on CPU our images equal diffusers' StableDiffusionXLPipeline on the same
folder (max abs difference <= 2e-3, output_type="np"), across batches, negative and second prompts, sizes,
micro-conditioning and guidance_rescale; fp16 decodes through a float32 VAE; the CLI draws with tiny-sdxl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from pipeline import InvalidInputError, Pipeline
from pipeline.cli import main

TOLERANCE = 2e-3
# a feature a test covers must move the image by far more than the tolerance, or the test could not fail
VISIBLE = 10 * TOLERANCE


def _ours(folder: Path, tmp_path: Path, dtype: torch.dtype | str = torch.float32) -> Pipeline:
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", dtype=dtype, cache_dir=tmp_path)
    pipe.progress = False
    return pipe


def _theirs(folder: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator().manual_seed(1234), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def pipes(
    tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Pipeline, StableDiffusionXLPipeline]:
    return _ours(tiny_sdxl, tmp_path_factory.mktemp("cache")), _theirs(tiny_sdxl)


def _assert_equal(pipes: tuple[Pipeline, StableDiffusionXLPipeline], **kwargs) -> np.ndarray:
    ours, theirs = pipes
    a, b = _images(ours, **kwargs), _images(theirs, **kwargs)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOLERANCE
    return a


def test_batches_non_square_and_zeroed_unconditional_half(pipes) -> None:
    """A list of prompts, two images each, 64x48; no negative prompt: SDXL base zeroes the uncond half."""
    a = _assert_equal(
        pipes,
        prompt=["a red fox in the snow", "a cat"],
        num_images_per_prompt=2,
        height=64,
        width=48,
        num_inference_steps=4,
    )
    assert a.shape == (4, 64, 48, 3)
    assert np.abs(a[0] - a[1]).max() > VISIBLE  # two images per prompt really differ
    assert pipes[0].family.default_guidance == 5.0 and pipes[0].family.default_steps == 50


def test_negative_and_second_prompts(pipes) -> None:
    """Negative prompts per prompt, prompt_2 per prompt and one negative_prompt_2 for all, 48x64."""
    request = {
        "prompt": ["a red fox", "a cat"],
        "negative_prompt": ["blurry", "a dog"],
        "height": 48,
        "width": 64,
        "num_inference_steps": 4,
        "guidance_scale": 7.0,
    }
    plain = _assert_equal(pipes, **request)
    second = _assert_equal(pipes, **request, prompt_2=["the snow", "a red fox"], negative_prompt_2="rain")
    assert second.shape == (2, 48, 64, 3)
    assert np.abs(second - plain).max() > VISIBLE


def test_guidance_rescale(pipes) -> None:
    request = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 9.0}
    rescaled = _assert_equal(pipes, **request, guidance_rescale=0.7)
    assert np.abs(rescaled - _images(pipes[0], **request)).max() > VISIBLE


def test_micro_conditioning(pipes) -> None:
    """original_size, crops_coords_top_left, target_size and the negative sizes become the UNet's time_ids."""
    request = {
        "prompt": "a fox",
        "negative_prompt": "a dog",
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
    }
    sized = _assert_equal(
        pipes,
        **request,
        original_size=(128, 96),
        crops_coords_top_left=(8, 4),
        target_size=(64, 64),
        negative_original_size=(32, 32),
        negative_target_size=(48, 48),
    )
    assert np.abs(sized - _images(pipes[0], **request)).max() > VISIBLE


def test_without_guidance(pipes) -> None:
    _assert_equal(pipes, prompt="a fox", height=64, width=64, num_inference_steps=3, guidance_scale=1.0)


def test_empty_negative_encoded_and_latents_mean_std(tiny_sdxl: Path, tmp_path: Path) -> None:
    """A model without force_zeros_for_empty_prompt encodes "" as the negative; a VAE config with
    latents_mean/latents_std denormalizes with them (both as diffusers does)."""
    folder = shutil.copytree(tiny_sdxl, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    vae = json.loads((folder / "vae" / "config.json").read_text())
    stats = {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.5, 1.5, 1.0, 2.0]}
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae, **stats)))
    request = {"prompt": ["a fox", "a cat"], "height": 64, "width": 64, "num_inference_steps": 3}
    ours = _images(_ours(folder, tmp_path), **request)
    assert np.abs(ours - _images(_theirs(folder), **request)).max() <= TOLERANCE
    assert np.abs(ours - _images(_ours(tiny_sdxl, tmp_path), **request)).max() > VISIBLE


def test_fp16_decodes_through_a_float32_vae(tiny_sdxl: Path, tmp_path: Path) -> None:
    """A VAE whose activations overflow float16 (as SDXL's does) decodes NaNs in fp16 unless its config's
    force_upcast puts it in float32; with it, fp16 images are finite and close to fp32 ones."""
    folder = shutil.copytree(tiny_sdxl, tmp_path / "model")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # activations past float16's 65504, normalized right after
    vae.save_pretrained(folder / "vae")
    request = {"prompt": "a fox", "height": 32, "width": 32, "num_inference_steps": 2}
    fp16 = _ours(folder, tmp_path / "a", "fp16")
    assert fp16.backend.engines["vae_decoder"].module.dtype == torch.float32
    assert fp16.backend.engines["unet"].module.dtype == torch.float16
    images = _images(fp16, **request)
    assert np.isfinite(images).all()
    assert np.abs(images - _images(_ours(folder, tmp_path / "b"), **request)).max() < 0.05
    assert np.abs(images - _images(_theirs(folder, torch.float16), **request)).max() < 0.05

    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps(dict(config, force_upcast=False)))
    no_upcast = _ours(folder, tmp_path / "c", "fp16")
    assert no_upcast.backend.engines["vae_decoder"].module.dtype == torch.float16
    assert np.isnan(_images(no_upcast, **request)).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_rescale": 1.5}, "guidance_rescale must be a number from 0 to 1"),
        ({"original_size": (64, 64, 3)}, "original_size must be two non-negative integers"),
        ({"crops_coords_top_left": (-1, 0)}, "crops_coords_top_left must be two"),
        ({"prompt_2": ["a", "b"]}, "prompt_2 must be a string or a list of 1 strings"),
        ({"negative_prompt_2": [3]}, "negative_prompt_2 must be"),
    ],
)
def test_bad_sdxl_requests_raise_typed_errors(pipes, kwargs: dict, message: str) -> None:
    call = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 1, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        pipes[0](**call)


def test_options_of_another_family_are_refused(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"original_size, prompt_2: not used by sd models"):
        _ours(tiny_sd, tmp_path)("a fox", prompt_2="snow", original_size=(64, 64), num_inference_steps=1)


def test_cli_draws_with_tiny_sdxl(tiny_sdxl: Path, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    fast = ["--height", "64", "--width", "48", "--steps", "2", "--backend", "torch", "--device", "cpu"]
    argv = ["a red fox", "--model", str(tiny_sdxl), *fast, "--seed", "7", "-o", str(out)]
    assert main([*argv, "--negative-prompt", "blurry", "--cache-dir", str(tmp_path / "cache")]) == 0
    with Image.open(out) as image:
        assert image.size == (48, 64)
        assert image.text["guidance_scale"] == "5.0"
        assert image.text["negative_prompt"] == "blurry"


def test_builtin_name_in_a_new_process(tmp_path: Path) -> None:
    """`python -m pipeline "..." --model tiny-sdxl` makes the model in the cache folder and draws."""
    out = tmp_path / "cat.png"
    command = [sys.executable, "-m", "pipeline", "a cat", "--model", "tiny-sdxl", "--steps", "2", "-q"]
    command += ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(out) as image:
        assert image.size == (64, 64)  # the tiny model's default size (its UNet's sample_size x 8)
