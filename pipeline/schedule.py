"""The denoising schedule, planned once per call from the chosen diffusers scheduler: tables or its own step.

Most diffusers schedulers (Euler, flow-matching Euler, DDIM with eta=0, PNDM/PLMS, DPM-Solver++, UniPC, LMS,
Heun, DEIS, KDPM2) are *linear*: the latents they return are a fixed linear combination of the initial noise
x0 and the model outputs e_0..e_k seen so far. For those we run the scheduler once on symbolic inputs
(latents = basis vector of x0, model output k = basis vector of e_k), which yields, for every model
evaluation k, the exact coefficients of

    model input_k = in_coef[k] . [x0, e_0, ..., e_{K-1}]          (includes scale_model_input)
    final latents = out_coef   . [x0, e_0, ..., e_{K-1}]

and the loop becomes one pure step over static device buffers (denoise.py), captured whole in a CUDA graph.

Every other configuration — fresh noise each step (ancestral, SDE, stochastic sampling, DDPM, LCM), clipping
or thresholding of the predicted sample — runs the scheduler's own `step` each iteration, as diffusers'
pipeline does, with the request's generator (`SchedulerSteps`, run by denoise.scheduler_loop).

Which path a configuration takes is decided in one place, `plan_schedule`: first what its config says
(`nonlinear_reason`), then a probe: random columns ride along the basis run, and the tables are used only if
they reproduce the scheduler on them (so an unknown scheduler, or a flag nobody listed, is classified safely).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

# Schedulers that draw fresh noise in every step whatever their config (beside any "*Ancestral*" class).
# Not TCDScheduler: at the eta=0 diffusers' pipelines pass it is deterministic, and the probe finds it linear.
STOCHASTIC_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "DPMSolverSDEScheduler",
        "LCMScheduler",
        "SASolverScheduler",
        "CMStochasticIterativeScheduler",
    }
)
# The probe: random columns at two scales ride along the basis run (a clip or threshold shows at the large
# one, fresh noise at both); the tables must reproduce them to this relative error (the schedulers compute in
# float32 internally).
PROBE_SCALES = (1.0, 1.0, 100.0, 100.0)
PROBE_TOLERANCE = 1e-4
# Planning 50 steps costs 13-70 ms of host time (PNDM 13, DPM-Solver 21, UniPC 71 on the 2-core CPU machine),
# so plans are kept per (scheduler class, config, steps, set_timesteps arguments).
PLAN_CACHE_SIZE = 64


@dataclass(frozen=True)
class Schedule:
    """Coefficient tables of one denoising run of a linear scheduler (float64, on the CPU until moved)."""

    timesteps: torch.Tensor  # (K,) scheduler timestep of each model evaluation
    in_coef: torch.Tensor  # (K, K+1) model input of evaluation k over [x0, e_0..e_{K-1}]
    out_coef: torch.Tensor  # (K+1,) final latents over [x0, e_0..e_{K-1}]
    num_inference_steps: int

    @property
    def num_evaluations(self) -> int:
        return int(self.timesteps.shape[0])


@dataclass
class SchedulerSteps:
    """A scheduler that is not linear, ready to run its own `step`: a fresh copy with its timesteps set."""

    scheduler: Any
    reason: str  # why the tables cannot stand in for it
    num_inference_steps: int

    @property
    def num_evaluations(self) -> int:
        return len(self.scheduler.timesteps)

    def step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        """What StableDiffusionPipeline.prepare_extra_step_kwargs passes to `step`: eta=0 and the generator,
        where the scheduler takes them. (FluxPipeline passes no generator, so its stochastic sampling draws
        from torch's global generator; we pass the request's, so a seed reproduces the image.)"""
        params = inspect.signature(self.scheduler.step).parameters
        extra: dict[str, Any] = {}
        if "eta" in params:
            extra["eta"] = 0.0
        if "generator" in params:
            extra["generator"] = generator
        return extra


def nonlinear_reason(scheduler: Any) -> str | None:
    """Why this scheduler configuration is not linear in (x0, model outputs), from its class and config alone;
    None where nothing there says so (the probe in `plan_schedule` then decides).

    Linear whatever they are set to: the sigma spacings (use_karras_sigmas, use_exponential_sigmas,
    use_beta_sigmas, use_lu_lambdas, timestep_spacing, shifts), prediction_type, solver_order, lower_order_final,
    euler_at_final, final_sigmas_type, rescale_betas_zero_snr, skip_prk_steps: they change coefficients only.
    """
    name = type(scheduler).__name__
    config = scheduler.config
    algorithm = str(config.get("algorithm_type") or "")
    if "Ancestral" in name or name in STOCHASTIC_SCHEDULERS:
        return f"{name} draws fresh noise each step"
    if "sde" in algorithm:
        return f"algorithm_type={algorithm!r} draws fresh noise each step"
    if config.get("stochastic_sampling"):
        return "stochastic_sampling=True draws fresh noise each step"
    if config.get("clip_sample"):
        return "clip_sample=True clips the predicted sample"
    if config.get("thresholding"):
        return "thresholding=True rescales the predicted sample by its own quantile"
    if str(config.get("variance_type") or "").startswith("learned"):
        return f"variance_type={config['variance_type']!r} reads a variance from the model output"
    return None


def plan_schedule(
    scheduler: Any,
    num_inference_steps: int,
    *,
    device: torch.device | str = "cpu",
    begin_index: bool = False,
    **set_timesteps_kwargs: Any,
) -> Schedule | SchedulerSteps:
    """Plan one run of `scheduler` (a diffusers scheduler; copied, never changed): its coefficient tables if it
    is linear, else a copy ready to step on `device`.

    `set_timesteps_kwargs` are what the family's diffusers pipeline passes to `set_timesteps` (for FLUX,
    `sigmas` and `mu`). With `sigmas`, the number of steps is the number of sigmas, as in diffusers.
    `begin_index`: the pipeline calls `set_begin_index(0)` (FLUX does; SD's pipelines do not).
    """
    reason = nonlinear_reason(scheduler)
    if reason is None:
        tables = _cached_tables(scheduler, num_inference_steps, begin_index, set_timesteps_kwargs)
        if isinstance(tables, Schedule):
            return tables
        reason = tables
    sched = prepared(scheduler, num_inference_steps, device, begin_index, set_timesteps_kwargs)
    steps = len(sched.timesteps) if set_timesteps_kwargs.get("sigmas") is not None else num_inference_steps
    return SchedulerSteps(sched, reason, steps)


def prepared(
    scheduler: Any,
    num_inference_steps: int,
    device: torch.device | str,
    begin_index: bool,
    set_timesteps_kwargs: dict[str, Any],
) -> Any:
    """A copy of `scheduler` with its timesteps set, as diffusers' `retrieve_timesteps` sets them."""
    sched = copy.deepcopy(scheduler)
    try:
        if set_timesteps_kwargs.get("sigmas") is not None:
            sched.set_timesteps(device=device, **set_timesteps_kwargs)
        else:
            sched.set_timesteps(num_inference_steps, device=device, **set_timesteps_kwargs)
    except ValueError as e:  # e.g. more steps than the scheduler's training timesteps
        raise InvalidInputError(f"scheduler {type(scheduler).__name__}: {e}") from e
    if begin_index and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched


# ---- the tables, and the probe that checks them -----------------------------------------------------------
_plans: OrderedDict[tuple[Any, ...], Schedule | str] = OrderedDict()
_plans_lock = threading.Lock()


def _cached_tables(scheduler: Any, steps: int, begin_index: bool, kwargs: dict[str, Any]) -> Schedule | str:
    key = (
        type(scheduler),
        json.dumps(dict(scheduler.config), sort_keys=True, default=repr),
        steps,
        begin_index,
        tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())),
    )
    with _plans_lock:
        if key in _plans:
            _plans.move_to_end(key)
            return _plans[key]
    plan = _tables(scheduler, steps, begin_index, kwargs)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray | torch.Tensor | list | tuple):
        return tuple(np.asarray(value, dtype=np.float64).ravel().tolist())
    return value


def _tables(scheduler: Any, steps: int, begin_index: bool, kwargs: dict[str, Any]) -> Schedule | str:
    """The coefficient tables, or why they do not reproduce the scheduler."""
    name = type(scheduler).__name__
    sched = prepared(scheduler, steps, "cpu", begin_index, kwargs)
    timesteps = sched.timesteps
    k_total = len(timesteps)
    n = k_total + 1
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(n, len(PROBE_SCALES), generator=generator, dtype=torch.float64)
    probe *= torch.tensor(PROBE_SCALES, dtype=torch.float64)
    # column j < n: history element j alone (the basis); columns >= n: random histories (the probe)
    columns = torch.cat([torch.eye(n, dtype=torch.float64), probe], dim=1)
    step_params = inspect.signature(sched.step).parameters
    extra: dict[str, Any] = {"eta": 0.0} if "eta" in step_params else {}
    if "generator" in step_params:
        extra["generator"] = torch.Generator().manual_seed(1)

    latents = columns[0:1] * float(getattr(sched, "init_noise_sigma", 1.0))
    inputs = []
    try:
        with torch.random.fork_rng(devices=[]):  # a scheduler drawing from the global generator leaves it be
            for k, t in enumerate(timesteps):
                model_in = (
                    sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
                )
                inputs.append(model_in[0].to(torch.float64))
                latents = sched.step(columns[k + 1 : k + 2], t, latents, return_dict=False, **extra)[0]
                latents = latents.to(torch.float64)
    except Exception as e:  # its own step, on real tensors, is the faithful path
        return f"{name} cannot run on symbolic inputs ({type(e).__name__}: {e})"
    in_all, out_all = torch.stack(inputs), latents[0]
    schedule = Schedule(
        timesteps=timesteps.to(torch.float64),
        in_coef=in_all[:, :n].clone(),
        out_coef=out_all[:n].clone(),
        num_inference_steps=k_total if kwargs.get("sigmas") is not None else steps,
    )
    expected_in = schedule.in_coef @ probe
    expected_out = schedule.out_coef @ probe
    error = max(_relative_error(in_all[:, n:], expected_in), _relative_error(out_all[n:], expected_out))
    if not error <= PROBE_TOLERANCE:
        logger.debug("%s: tables off by %.3g on the probe; running its own step", name, error)
        return f"{name} is not linear here (its tables miss a random probe by {error:.2g})"
    return schedule


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error per probe column, relative to that column's size."""
    scale = expected.abs().reshape(-1, expected.shape[-1]).amax(0).clamp(min=1.0)
    return float(((actual - expected).abs().reshape(-1, expected.shape[-1]).amax(0) / scale).max())
