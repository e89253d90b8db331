"""The library as a new user meets it: the README's example, seeds, dtype knobs, typed errors, quiet loads."""

from __future__ import annotations

import doctest
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import InvalidInputError, Pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}


def _pipe(folder: Path, factory: pytest.TempPathFactory) -> Pipeline:
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", cache_dir=factory.mktemp("cache"))
    pipe.progress = False
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return _pipe(tiny_sd, tmp_path_factory)


@pytest.fixture(scope="module")
def flux(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return _pipe(tiny_flux, tmp_path_factory)


def _readme_notebook_block() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("From a notebook or an app:")
    return text[text.index("```python\n", start) + len("```python\n") : text.index("```\n", start + 30)]


def test_readme_notebook_example_prints_what_it_shows(
    tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's block, run as a doctest on the tiny FLUX-dev (same family, same defaults) on this CPU:
    only the model, the size and what the machine changes (device, dtype, backend) are swapped."""
    monkeypatch.chdir(tmp_path)
    block = _readme_notebook_block()
    swaps = {
        '"black-forest-labs/FLUX.1-dev"': repr(str(tiny_flux)),
        "'black-forest-labs/FLUX.1-dev'": repr(str(tiny_flux)),
        "device='cuda'": "device='cpu'",
        "dtype=torch.bfloat16": "dtype=torch.float32",
        "'torch (compiled, cuda graphs, specialization none)'": "'torch (eager, no graphs)'",
        "height=1024, width=1024": "height=64, width=64",
    }
    for old, new in swaps.items():
        assert old in block, f"the README example no longer has {old}"
        block = block.replace(old, new)
    test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
    assert runner.tries >= 7 and (tmp_path / "fox.png").is_file()


def test_image_i_of_a_call_is_reproduced_alone_by_seed_plus_i(sd: Pipeline) -> None:
    out = sd(["a red fox", "a cat"], num_images_per_prompt=2, seed=40, **FAST)
    assert out.seed == 40 and out.seeds == [40, 41, 42, 43]
    alone = sd("a cat", seed=43, **FAST)
    assert alone.seeds == [43]
    np.testing.assert_allclose(alone.images[0], out.images[3], atol=1e-5)
    assert np.abs(out.images[2] - out.images[3]).max() > 1e-3  # each image its own noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, r"seed must be a whole number in \[0, 2\*\*64\)"),
        ({"seed": 2**64}, r"seed must be"),
        ({"seed": 2**64 - 1, "num_images_per_prompt": 2}, r"seed \+ 1 too, for 2 images"),
        ({"seed": "7"}, r"seed must be"),
        ({"guidance_scale": "7.5"}, "guidance_scale must be a number"),
        ({"guidance_scale": True}, "guidance_scale must be a number"),
        ({"generator": [torch.Generator()] * 2}, "list of 2 generators for 1 images"),
        ({"generator": 7}, "generator must be a torch.Generator"),
        ({"prompt": ("a", "tuple")}, "prompt must be a string"),
    ],
)
def test_wrong_types_and_ranges_are_invalid_input(sd: Pipeline, kwargs: dict, message: str) -> None:
    call = {"prompt": "a fox", **FAST, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        sd(**call)


def test_max_sequence_length_past_the_text_encoder_is_invalid_input(flux: Pipeline) -> None:
    with pytest.raises(InvalidInputError, match="from 1 to 512"):
        flux("a fox", max_sequence_length=1024, **FAST)
    assert flux("a fox", max_sequence_length=512, **FAST).images.shape == (1, 64, 64, 3)


def test_a_blank_prompt_is_allowed_with_one_warning(sd: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = sd("   ", **FAST)
    assert out.images.shape == (1, 64, 64, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["the prompt is blank: the image will not follow any text"]


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_a_long_prompt_gives_one_short_warning_with_the_tokens_dropped(
    family: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = request.getfixturevalue(family)
    prompt = " ".join(["fox"] * 5000)
    tokenizer = pipe.source.tokenizer("tokenizer_2" if family == "flux" else "tokenizer")
    limit = 64 if family == "flux" else tokenizer.model_max_length
    dropped = len(tokenizer(prompt, verbose=False).input_ids) - limit
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        pipe(prompt, max_sequence_length=64, **FAST)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and len(warnings[0]) < 200, warnings
    assert f"{dropped:,} token(s) dropped" in warnings[0]


def test_flux_ignores_a_negative_prompt_once_and_does_not_record_it(
    flux: Pipeline, sd: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = flux("a fox", negative_prompt="blurry", **FAST)
    assert [r.getMessage() for r in caplog.records] == [
        "negative prompt ignored: flux is guidance-distilled and has no negative prompt"
    ]
    assert out.settings["negative_prompt"] is None
    assert sd("a fox", negative_prompt="blurry", **FAST).settings["negative_prompt"] == "blurry"


def test_one_dtype_knob_and_the_log_says_which_dtype_is_used(
    tiny_sd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = {"backend": "torch", "device": "cpu", "cache_dir": tmp_path}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        pipe = Pipeline.from_pretrained(tiny_sd, torch_dtype=torch.bfloat16, **kwargs)  # diffusers' name
    assert pipe.dtype == torch.bfloat16
    assert next(pipe.backend.modules["unet"].parameters()).dtype == torch.bfloat16
    assert any(re.search(r"on cpu, weights bf16, backend torch", r.getMessage()) for r in caplog.records)
    assert Pipeline.from_pretrained(tiny_sd, dtype="bf16", torch_dtype=torch.bfloat16, **kwargs).dtype == (
        torch.bfloat16
    )
    with pytest.raises(InvalidInputError, match="disagree"):
        Pipeline.from_pretrained(tiny_sd, dtype="fp16", torch_dtype=torch.bfloat16, **kwargs)
    with pytest.raises(InvalidInputError, match=r"bf16 is the weights' dtype: pass dtype='bf16'"):
        Pipeline.from_pretrained(tiny_sd, precision="bf16", **kwargs)


def test_repr_says_what_the_pipeline_is(sd: Pipeline, tiny_sd: Path) -> None:
    assert repr(sd) == (
        f"Pipeline(model={str(tiny_sd)!r}, family='sd', device='cpu', dtype=torch.float32, "
        "backend='torch (eager, no graphs)')"
    )


def test_loading_shows_no_per_component_weight_bars(tiny_sd: Path, tmp_path: Path, capfd) -> None:
    import transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()  # as in a fresh notebook
    transformers.CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")
    assert "Loading weights" in capfd.readouterr().err  # what a plain transformers load shows

    Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # the user's setting, given back


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (stream ordering)")
def test_the_call_waits_for_work_the_caller_enqueued_on_its_stream(tiny_sd: Path, tmp_path: Path) -> None:
    """The caller changes a weight on its own stream behind a long GPU sleep, then calls the pipeline at
    once: the image must see the change (our stream waited), and the latents it returns are final on the
    caller's stream (it waited for ours)."""
    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", dtype=torch.float32, cache_dir=tmp_path)
    pipe.progress = False
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 1, "output_type": "latent"}
    before = pipe("a fox", **kwargs).images.clone()
    conv = pipe.backend.modules["unet"].conv_out
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on this stream
        with torch.no_grad():
            conv.weight.mul_(3.0)
        after = pipe("a fox", **kwargs).images
        copy = after.clone()  # on the caller's stream, right after the call
    torch.cuda.synchronize()
    assert not torch.allclose(before, after)  # the changed weight was used
    assert torch.equal(copy, after)
