"""What the server builds on: `callback_on_step_end` (diffusers' name and signature) and one call for several
requests (lists of prompts, negative prompts and generators) giving each the image a call of its own gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import Pipeline
from pipeline.schedule import plan_schedule


@pytest.fixture(scope="module")
def pipe(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    p = Pipeline.from_pretrained(
        tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path_factory.mktemp("cache")
    )
    p.progress = False
    return p


def test_callback_on_step_end_runs_after_every_step(pipe: Pipeline) -> None:
    calls: list[tuple] = []

    def callback(p: Pipeline, i: int, t: Any, kwargs: dict) -> dict:
        calls.append((p, i, float(t), kwargs, p.num_timesteps))
        return kwargs

    pipe("a cat", height=32, width=32, num_inference_steps=4, seed=0, callback_on_step_end=callback)
    expected = plan_schedule(pipe.source.scheduler, 4).timesteps.tolist()
    assert [c[1] for c in calls] == list(range(len(expected))) == list(range(pipe.num_timesteps))
    assert [c[2] for c in calls] == pytest.approx(expected)
    assert all(c[0] is pipe and c[3] == {} and c[4] == len(expected) for c in calls)


def test_a_callback_that_raises_stops_the_call_and_the_pipeline_stays_usable(pipe: Pipeline) -> None:
    class Stop(Exception):
        pass

    def stop_at_two(p: Pipeline, i: int, t: Any, kwargs: dict) -> dict:
        if i == 1:
            raise Stop
        return kwargs

    with pytest.raises(Stop):
        pipe("a cat", height=32, width=32, num_inference_steps=6, seed=0, callback_on_step_end=stop_at_two)
    again = pipe("a cat", height=32, width=32, num_inference_steps=2, seed=0, output_type="np").images
    assert again.shape == (1, 32, 32, 3)


def test_one_call_with_a_generator_per_image_equals_separate_calls(pipe: Pipeline) -> None:
    prompts, negatives, seeds = ["a cat", "a dog", "a fox"], ["", "blur", ""], [5, 6, 7]
    kw = {"height": 32, "width": 32, "num_inference_steps": 3, "output_type": "np"}
    batch = pipe(
        prompts,
        negative_prompt=negatives,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        **kw,
    ).images
    for i, (prompt, negative, seed) in enumerate(zip(prompts, negatives, seeds, strict=True)):
        solo = pipe(
            prompt, negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(seed), **kw
        )
        np.testing.assert_allclose(batch[i], solo.images[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)
