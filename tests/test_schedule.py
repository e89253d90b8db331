"""The schedule tables reproduce each supported diffusers scheduler step by step, on random data."""

from __future__ import annotations

import copy

import diffusers
import numpy as np
import pytest
import torch

from pipeline.errors import UnsupportedModelError
from pipeline.schedule import plan_schedule

BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
CASES = [
    ("PNDMScheduler", {**BETAS, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}, {}),
    ("DDIMScheduler", {**BETAS, "prediction_type": "v_prediction", "clip_sample": False}, {}),
    ("EulerDiscreteScheduler", BETAS, {}),
    ("DPMSolverMultistepScheduler", BETAS, {}),
    ("UniPCMultistepScheduler", BETAS, {}),
    ("HeunDiscreteScheduler", BETAS, {}),
    ("LMSDiscreteScheduler", BETAS, {}),
    (
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "use_dynamic_shifting": True},
        {"sigmas": np.linspace(1.0, 1 / 6, 6), "mu": 0.9},
    ),
]


def _run_diffusers(scheduler, steps: int, kwargs: dict, shape: tuple[int, ...]):
    s = copy.deepcopy(scheduler)
    if kwargs.get("sigmas") is not None:
        s.set_timesteps(**kwargs)
    else:
        s.set_timesteps(steps, **kwargs)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    history, inputs = [x0.double()], []
    x = x0 * getattr(s, "init_noise_sigma", 1.0)
    for t in s.timesteps:
        inputs.append(s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x)
        e = torch.randn(shape, generator=g)
        history.append(e.double())
        x = s.step(e, t, x, return_dict=False)[0]
    return torch.stack(history).flatten(1), inputs, x


@pytest.mark.parametrize(("name", "config", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_tables_reproduce_scheduler(name: str, config: dict, kwargs: dict) -> None:
    scheduler = getattr(diffusers, name)(**config)
    plan = plan_schedule(scheduler, 6, **kwargs)
    history, inputs, final = _run_diffusers(scheduler, 6, kwargs, (2, 4, 8, 8))
    assert plan.num_evaluations == len(inputs)
    scale = max(1.0, final.abs().max().item())
    for k, x in enumerate(inputs):
        ours = plan.in_coef[k] @ history
        assert torch.allclose(ours, x.flatten().double(), atol=1e-5 * scale), f"model input {k}"
    assert torch.allclose(plan.out_coef @ history, final.flatten().double(), atol=1e-5 * scale)


def test_plan_does_not_change_the_scheduler() -> None:
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS)
    before = copy.deepcopy(scheduler.__dict__.get("timesteps"))
    plan_schedule(scheduler, 4)
    assert torch.equal(scheduler.timesteps, before)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_stochastic_schedulers_are_refused(name: str) -> None:
    with pytest.raises(UnsupportedModelError):
        plan_schedule(getattr(diffusers, name)(**BETAS), 4)
