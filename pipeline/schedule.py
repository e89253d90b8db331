"""The denoising schedule as tables of numbers, computed once per call from the model's own scheduler.

Every deterministic diffusers scheduler (Euler, flow-matching Euler, DDIM with eta=0, PNDM/PLMS, DPM-Solver++,
UniPC, LMS, Heun, DEIS) is *linear*: the latents it returns are a fixed linear combination of the initial
noise x0 and the model outputs e_0..e_k seen so far. So instead of re-implementing each scheduler we run the
model's own scheduler once per call on symbolic inputs: latents = basis vector of x0, model output k = basis
vector of e_k. What comes out is, for every model evaluation k, the exact coefficients of

    model input_k = in_coef[k] . [x0, e_0, ..., e_{K-1}]          (includes scale_model_input)
    final latents = out_coef   . [x0, e_0, ..., e_{K-1}]

The denoising loop then keeps a history buffer H = [x0, e_0, ...] on the device and one step is
`x = in_coef[k] @ H; e = model(x, t[k]); H[k+1] = e`: a pure function of static-shaped device tensors with no
host sync, which a CUDA graph can capture; and the numbers are the ones diffusers' scheduler gives.
Stochastic schedulers (ancestral, SDE, DDPM) are not linear and are refused with a clear error.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedModelError

LINEAR_SCHEDULERS = frozenset(
    {
        "FlowMatchEulerDiscreteScheduler",
        "EulerDiscreteScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DEISMultistepScheduler",
    }
)


@dataclass(frozen=True)
class Schedule:
    """Coefficient tables of one denoising run (float64, on the CPU until moved)."""

    timesteps: torch.Tensor  # (K,) scheduler timestep of each model evaluation
    in_coef: torch.Tensor  # (K, K+1) model input of evaluation k over [x0, e_0..e_{K-1}]
    out_coef: torch.Tensor  # (K+1,) final latents over [x0, e_0..e_{K-1}]
    num_inference_steps: int

    @property
    def num_evaluations(self) -> int:
        return int(self.timesteps.shape[0])


def _check_linear(scheduler: Any) -> None:
    name = type(scheduler).__name__
    config = scheduler.config
    stochastic = name not in LINEAR_SCHEDULERS or "sde" in str(config.get("algorithm_type", ""))
    if stochastic:
        raise UnsupportedModelError(
            f"scheduler {name} ({config.get('algorithm_type', '')}) adds fresh noise each step and is not "
            f"supported; use one of {sorted(LINEAR_SCHEDULERS)} (set it in the model's scheduler/ folder)"
        )
    if config.get("thresholding", False):
        raise UnsupportedModelError(f"scheduler {name} with thresholding=True is not supported")


def plan_schedule(
    scheduler: Any, num_inference_steps: int, *, begin_index: bool = False, **set_timesteps_kwargs: Any
) -> Schedule:
    """Run `scheduler` (a diffusers scheduler; copied, never changed) on a basis and return its tables.

    `set_timesteps_kwargs` are what the family's diffusers pipeline passes to `set_timesteps` (for FLUX,
    `sigmas` and `mu`). With `sigmas`, the number of steps is the number of sigmas, as in diffusers.
    """
    _check_linear(scheduler)
    sched = copy.deepcopy(scheduler)
    if set_timesteps_kwargs.get("sigmas") is not None:
        sched.set_timesteps(device="cpu", **set_timesteps_kwargs)
        num_inference_steps = len(sched.timesteps)
    else:
        sched.set_timesteps(num_inference_steps, device="cpu", **set_timesteps_kwargs)
    if begin_index and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    timesteps = sched.timesteps
    k_total = len(timesteps)
    basis = torch.eye(k_total + 1, dtype=torch.float64)

    step_params = inspect.signature(sched.step).parameters
    extra = {"eta": 0.0} if "eta" in step_params else {}

    latents = basis[0:1] * float(getattr(sched, "init_noise_sigma", 1.0))
    in_rows = []
    for k, t in enumerate(timesteps):
        model_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        in_rows.append(model_in[0].to(torch.float64))
        latents = sched.step(basis[k + 1 : k + 2], t, latents, return_dict=False, **extra)[0]
        latents = latents.to(torch.float64)
    return Schedule(
        timesteps=timesteps.to(torch.float64),
        in_coef=torch.stack(in_rows),
        out_coef=latents[0].clone(),
        num_inference_steps=num_inference_steps,
    )
