"""Schedule buffers padded past the run's step count (denoise.step_capacity), so that one CUDA graph per size
serves every step count up to the capacity. The graphs need a GPU; here: the padded run is the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Pipeline
from pipeline.denoise import GRAPH_STEPS, step_capacity


def test_the_capacity_is_64_steps_then_doubles_within_the_memory_budget() -> None:
    assert GRAPH_STEPS == 64
    assert [step_capacity(k, 1000, 10**9) for k in (1, 4, 28, 50, 64, 65, 200)] == [64] * 5 + [128, 256]
    assert step_capacity(30, 10**6, 65 * 10**6) == 64  # 65 rows of history fit the budget exactly
    assert step_capacity(30, 10**6, 65 * 10**6 - 1) == 30  # one byte short: the run keeps its own length


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux"])
def test_a_padded_schedule_gives_the_image_of_its_own(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
):
    folder = request.getfixturevalue(model)
    pipe = Pipeline.from_pretrained(
        folder, backend="torch", device="cpu", dtype=torch.float32, cache_dir=tmp_path
    )
    pipe.progress = False
    steps: list[int] = []

    def run(**kwargs):
        steps.clear()
        return pipe(
            "a cat",
            height=32,
            width=32,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
            callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw,
        ).images

    own = run()
    evaluations = list(steps)  # 5 steps; SD's PNDM evaluates its first step twice
    assert evaluations[:5] == list(range(5))
    rows: list[int] = []
    denoise = pipe.backend.denoise

    def recorded(state, make_step, on_step):
        rows.append(state.history.shape[0])
        return denoise(state, make_step, on_step)

    pipe.backend.step_capacity = lambda k, row_bytes: step_capacity(k, row_bytes, 10**9)
    pipe.backend.denoise = recorded
    padded = run()
    assert rows == [GRAPH_STEPS + 1]  # x0 and 64 steps' outputs, 5 of them written
    assert steps == evaluations  # the run's own steps, not the capacity
    np.testing.assert_allclose(padded, own, atol=1e-6)
