"""The schedule tables reproduce each linear diffusers scheduler step by step, on random data; every other
configuration is recognised (by its config, and by the probe alone) and planned to run its own step."""

from __future__ import annotations

import copy

import diffusers
import numpy as np
import pytest
import torch

import pipeline.schedule
from pipeline.errors import InvalidInputError
from pipeline.schedule import Schedule, SchedulerSteps, plan_schedule

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
    ("KDPM2DiscreteScheduler", BETAS, {}),
    ("DEISMultistepScheduler", BETAS, {}),
    ("DPMSolverSinglestepScheduler", BETAS, {}),
    ("EulerDiscreteScheduler", {**BETAS, "use_karras_sigmas": True}, {}),
    ("DPMSolverMultistepScheduler", {**BETAS, "use_karras_sigmas": True, "solver_order": 3}, {}),
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
    assert isinstance(plan, Schedule), plan.reason
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


FLOW = {"shift": 3.0, "use_dynamic_shifting": True}
FLOW_KWARGS = {"sigmas": np.linspace(1.0, 1 / 6, 6), "mu": 0.9}
NONLINEAR = [
    ("DDIMScheduler", BETAS, {}, "clip_sample"),  # DDIM's default
    ("DDIMScheduler", {**BETAS, "clip_sample": False, "thresholding": True}, {}, "thresholding"),
    ("FlowMatchEulerDiscreteScheduler", {**FLOW, "stochastic_sampling": True}, FLOW_KWARGS, "stochastic"),
    ("DPMSolverMultistepScheduler", {**BETAS, "algorithm_type": "sde-dpmsolver++"}, {}, "sde"),
    ("DPMSolverSinglestepScheduler", {**BETAS, "algorithm_type": "sde-dpmsolver++"}, {}, "sde"),
    ("DPMSolverMultistepScheduler", {**BETAS, "variance_type": "learned_range"}, {}, "variance"),
    ("EulerAncestralDiscreteScheduler", BETAS, {}, "noise"),
    ("KDPM2AncestralDiscreteScheduler", BETAS, {}, "noise"),
    ("DDPMScheduler", {**BETAS, "clip_sample": False}, {}, "noise"),
    ("LCMScheduler", BETAS, {}, "noise"),
    ("HeunDiscreteScheduler", {**BETAS, "clip_sample": True}, {}, "clip_sample"),
]
NONLINEAR_IDS = [f"{c[0]}-{c[3]}" for c in NONLINEAR]


@pytest.mark.parametrize(("name", "config", "kwargs", "why"), NONLINEAR, ids=NONLINEAR_IDS)
def test_nonlinear_configurations_run_their_own_step(name: str, config: dict, kwargs: dict, why: str) -> None:
    plan = plan_schedule(getattr(diffusers, name)(**config), 6, **kwargs)
    assert isinstance(plan, SchedulerSteps)
    assert why in plan.reason
    assert len(plan.scheduler.timesteps) == plan.num_evaluations > 0  # ready to step


@pytest.mark.parametrize(
    ("name", "config", "kwargs", "why"),
    [c for c in NONLINEAR if c[3] != "variance"],  # learned variance slices channels: no probe shape has them
    ids=[i for c, i in zip(NONLINEAR, NONLINEAR_IDS, strict=True) if c[3] != "variance"],
)
def test_the_probe_alone_finds_them(
    name: str, config: dict, kwargs: dict, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the list of flags, the probe still refuses the tables: an unknown scheduler is safe."""
    monkeypatch.setattr(pipeline.schedule, "nonlinear_reason", lambda scheduler: None)
    pipeline.schedule._plans.clear()
    plan = plan_schedule(getattr(diffusers, name)(**config), 6, **kwargs)
    assert isinstance(plan, SchedulerSteps)
    assert "probe" in plan.reason or "symbolic" in plan.reason  # thresholding fails on the probe's shape


class ClampingEuler(diffusers.EulerDiscreteScheduler):
    """A scheduler nobody listed, nonlinear by a clamp in its step."""

    def step(self, model_output, timestep, sample, **kwargs):
        return super().step(model_output.clamp(-1, 1), timestep, sample, **kwargs)


def test_an_unknown_nonlinear_scheduler_runs_its_own_step() -> None:
    assert isinstance(plan_schedule(ClampingEuler(**BETAS), 6), SchedulerSteps)
    assert isinstance(plan_schedule(diffusers.EulerDiscreteScheduler(**BETAS), 6), Schedule)


def test_tcd_at_eta_zero_is_linear() -> None:
    """StableDiffusionPipeline passes eta=0.0, at which TCD's step is deterministic: the tables hold."""
    assert isinstance(plan_schedule(diffusers.TCDScheduler(**BETAS), 6), Schedule)


def test_planning_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(3)
    expected = torch.randn(4)
    torch.manual_seed(3)
    for scheduler in (diffusers.EulerAncestralDiscreteScheduler(**BETAS), ClampingEuler(**BETAS)):
        plan_schedule(scheduler, 5)
    assert torch.equal(torch.randn(4), expected)


def test_too_many_steps_is_an_input_error() -> None:
    with pytest.raises(InvalidInputError, match=r"DDIMScheduler.*cannot be larger"):
        plan_schedule(diffusers.DDIMScheduler(**BETAS, clip_sample=False), 5000)
