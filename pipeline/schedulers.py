"""Choosing the scheduler: any diffusers scheduler the model can use, checked before any weights load.

`build_scheduler` makes one, `check_scheduler` refuses one the model cannot run. A name is one of the
model's scheduler's `compatibles` (diffusers' own list), built with `from_config` on the
model's scheduler config, as diffusers users do (`EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.
config)`); a scheduler instance is taken as it is (LCM and other schedulers outside that list included). A
scheduler that cannot run with the model is refused here, before the weights load: by what its config says,
then by a dry run of the very loop the pipeline will run (schedule.py decides tables or its own step) on a
latent of a few pixels, with random model outputs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import InvalidInputError, PipelineError
from .families import FAMILIES, Family
from .schedule import SchedulerSteps, plan_schedule

logger = logging.getLogger(__name__)


def compatible_names(scheduler: Any) -> list[str]:
    """Class names of the diffusers schedulers that can stand in for `scheduler` (its own included)."""
    return sorted({cls.__name__ for cls in scheduler.compatibles} | {type(scheduler).__name__})


def family_scheduler_names() -> dict[str, list[str]]:
    """For --help: per family, the schedulers compatible with its reference checkpoint's scheduler, each with
    the extra package it needs where one is missing."""
    import diffusers

    names = {}
    for family in FAMILIES:
        base = getattr(diffusers, family.scheduler_class)
        listed = []
        for name in sorted({c.__name__ for c in base().compatibles}):
            needs = _missing_packages(getattr(diffusers, name))
            listed.append(f"{name} (needs {needs})" if needs else name)
        names[family.name] = listed
    return names


def _missing_packages(cls: type) -> str | None:
    """diffusers exports a placeholder class where a scheduler's optional package (torchsde) is missing."""
    from diffusers.utils import DummyObject

    if isinstance(cls, DummyObject):
        return ", ".join(b for b in getattr(cls, "_backends", ()) if b != "torch") or "an extra package"
    return None


def build_scheduler(value: Any, model_scheduler: Any) -> Any:
    """The scheduler for `value`: None (the model's own), a class name among the model's compatibles or a
    scheduler class (either built with `from_config` on `model_scheduler`'s config), or an instance (as is).
    Raises InvalidInputError."""
    from diffusers import SchedulerMixin

    if value is None:
        return model_scheduler
    if isinstance(value, str):
        return _by_name(value, model_scheduler)
    if isinstance(value, type) and issubclass(value, SchedulerMixin):
        return _from_config(value, model_scheduler)
    if isinstance(value, SchedulerMixin):
        if type(value).__name__ not in compatible_names(model_scheduler):
            logger.info(
                "%s is not among this model's compatible schedulers; using it as given", type(value).__name__
            )
        return value
    raise InvalidInputError(
        f"scheduler must be a diffusers scheduler, its class or its class name, got {type(value).__name__}"
    )


def _by_name(name: str, model_scheduler: Any) -> Any:
    import diffusers

    valid = compatible_names(model_scheduler)
    if name not in valid:
        raise InvalidInputError(
            f"unknown scheduler {name!r} for this model; choose one of {', '.join(valid)}"
        )
    return _from_config(getattr(diffusers, name), model_scheduler)


def _from_config(cls: type, model_scheduler: Any) -> Any:
    needs = _missing_packages(cls)
    if needs:
        raise InvalidInputError(f"scheduler {cls.__name__} needs {needs}: pip install {needs}")
    return cls.from_config(model_scheduler.config)


def check_scheduler(scheduler: Any, family: Family) -> str:
    """Refuse a scheduler that cannot run with `family`'s model, before any weights load. Returns which loop
    it runs, in a few words for the log."""
    name = type(scheduler).__name__
    variance = str(scheduler.config.get("variance_type") or "")
    if variance.startswith("learned"):
        raise InvalidInputError(
            f"scheduler {name} with variance_type={variance!r} reads a predicted variance from extra channels of "
            f"the model output (written for DeepFloyd IF, whose pixel UNets predict 3 noise + 3 variance "
            f"channels); this model's {family.denoiser} predicts only its latent channels: leave variance_type "
            "unset"
        )
    size = 2 * family.granularity
    steps = family.default_steps
    try:
        plan = plan_schedule(
            scheduler,
            steps,
            begin_index=family.schedule_begin_index,
            **family.schedule_kwargs(size, size, steps),
        )
        if isinstance(plan, SchedulerSteps):
            _dry_run(plan, family, size)
    except PipelineError:
        raise
    except Exception as e:  # a chosen component failing is the user's to fix, in one line
        raise InvalidInputError(
            f"scheduler {name} cannot run with this {family.name} model ({type(e).__name__}: {e})"
        ) from e
    if isinstance(plan, SchedulerSteps):
        return f"{name}, its own step each iteration: {plan.reason}"
    return f"{name}, linear: coefficient tables"


def _dry_run(plan: SchedulerSteps, family: Family, size: int) -> None:
    from .denoise import scheduler_loop

    generator = torch.Generator().manual_seed(0)
    x0 = family.pack_latents(torch.randn(family.latent_shape(1, size, size), generator=generator), size, size)
    with torch.random.fork_rng(devices=[]):
        scheduler_loop(
            plan, x0, lambda x, k: torch.randn(x.shape, generator=generator), generator, lambda: None
        )
