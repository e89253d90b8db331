"""The two denoising loops measured in one process: a linear scheduler on its tables vs a scheduler's own step.

    python scripts/scheduler_check.py --model sd15 --device cuda --out DIR                 # the GPU figures
    python scripts/scheduler_check.py --model tiny-sd --device cpu --size 64 --steps 4 --out DIR

Per scheduler: our denoise seconds per call (tables, or its own step between graph-captured denoiser calls);
for the own-step ones on CUDA, the same loop without its CUDA graphs, whose final latents the graphed loop must
match (relative L2; exit status 1 past TOLERANCE: the graphs' own correctness, same kernels either way), and
the loop run eagerly (reported, not judged: deterministic samplers on random weights amplify the compiled
kernels' rounding differences, DDIM turns 0.1% of noise on each denoiser output into ~90% of the final latents
on SD 1.5's architecture, where Euler Ancestral stays at 0.3%); and the host time of the scheduler's own update per
step at the model's latent size (scale_model_input + step, the part that runs outside any graph). Real-size
architectures have random weights (no download). Writes scheduler_check.json under --out, prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from pipeline.denoise import scheduler_loop
from pipeline.pipeline import Pipeline
from pipeline.schedule import Schedule, SchedulerSteps, plan_schedule, prepared

logger = logging.getLogger("scheduler_check")
PROMPT = "a photo of a red fox in the snow"
TOLERANCE = 0.05  # relative L2 error of final latents, graphed own-step loop vs the same loop ungraphed
SD_SCHEDULERS = {  # label: (class, config overrides)
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "ddim-clip-sample": ("DDIMScheduler", {"clip_sample": True}),
}
FLUX_SCHEDULERS = {
    "flow-match": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-match-stochastic": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def call(pipe: Pipeline, args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    out = pipe(
        PROMPT,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.images, out.timings["denoise"]


def host_step_s(pipe: Pipeline, args: argparse.Namespace) -> float:
    """Seconds per step of the scheduler's own update alone (a fixed tensor stands in for the denoiser)."""
    family, device = pipe.family, pipe.device
    kwargs = family.schedule_kwargs(args.size, args.size, args.steps)
    # a linear scheduler too: what its own step would cost, beside the tables
    sched = prepared(pipe.scheduler, args.steps, device, family.schedule_begin_index, kwargs)
    plan = SchedulerSteps(sched, "measured", args.steps)
    noise = torch.randn(
        family.latent_shape(1, args.size, args.size), generator=torch.Generator().manual_seed(0)
    )
    x0 = family.pack_latents(noise, args.size, args.size).to(device, pipe.dtype)
    output = torch.randn_like(x0)
    sync(device)
    start = time.perf_counter()
    scheduler_loop(plan, x0, lambda x, k: output, torch.Generator().manual_seed(0), lambda: None)
    sync(device)
    return (time.perf_counter() - start) / plan.num_evaluations


def measure(
    pipe: Pipeline, args: argparse.Namespace, label: str, cls: str, overrides: dict
) -> dict[str, Any]:
    import diffusers

    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.model_scheduler.config, **overrides)
    plan = plan_schedule(
        pipe.scheduler,
        args.steps,
        begin_index=pipe.family.schedule_begin_index,
        **pipe.family.schedule_kwargs(args.size, args.size, args.steps),
    )
    r: dict[str, Any] = {"loop": "tables" if isinstance(plan, Schedule) else "own step"}
    _, r["first_denoise_s"] = call(pipe, args)  # compiles / captures
    latents = None
    times = []
    for _ in range(args.iterations):
        latents, seconds = call(pipe, args)
        times.append(seconds)
    r["denoise_s"] = min(times)
    r["host_step_ms"] = 1e3 * host_step_s(pipe, args)
    if isinstance(plan, SchedulerSteps) and pipe.device.type == "cuda":
        pipe.backend.graphed = lambda name, fn: fn  # the same loop, its denoiser call without graphs
        try:
            runs = [call(pipe, args) for _ in range(args.iterations)]
        finally:
            del pipe.backend.graphed
        r["denoise_no_graphs_s"] = min(seconds for _, seconds in runs)
        r["graphed_vs_ungraphed_rel_err"] = rel(latents, runs[0][0])
        with pipe.backend.uncompiled():
            eager, r["denoise_eager_s"] = call(pipe, args)
        r["graphed_vs_eager_rel_err"] = rel(latents, eager)
    logger.info("%s: %s", label, r)
    return r


def env(device: torch.device) -> dict[str, Any]:
    import diffusers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": str(date.today()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="sd15", help="sd15, sd21, flux-schnell, tiny-sd, tiny-flux or a folder"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: the family's on a GPU, fp32 on CPU")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: the user cache)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="scheduler labels to run (default: all of the family's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(
        args.model, backend="torch", device=args.device, dtype=args.dtype, cache_dir=args.cache
    )
    pipe.progress = False
    schedulers = FLUX_SCHEDULERS if pipe.family.name == "flux" else SD_SCHEDULERS
    schedulers = {k: v for k, v in schedulers.items() if not args.only or k in args.only}
    r: dict[str, Any] = {"model": args.model, "size": args.size, "steps": args.steps, **env(pipe.device)}
    r["backend"] = pipe.backend.describe()
    ok = True
    for label, (cls, overrides) in schedulers.items():
        r[label] = measure(pipe, args, label, cls, overrides)
        ok = ok and r[label].get("graphed_vs_ungraphed_rel_err", 0.0) < TOLERANCE
        (args.out / "scheduler_check.json").write_text(json.dumps(r, indent=1))
    pipe.close()
    r["ok"] = ok
    (args.out / "scheduler_check.json").write_text(json.dumps(r, indent=1))
    keys = (
        "loop",
        "denoise_s",
        "denoise_no_graphs_s",
        "denoise_eager_s",
        "host_step_ms",
        "graphed_vs_ungraphed_rel_err",
        "graphed_vs_eager_rel_err",
    )
    print(f"{'scheduler':22s} " + " ".join(f"{k:>24s}" for k in keys))
    for label in schedulers:
        row = r[label]
        cells = [row.get(k, "") for k in keys]
        print(
            f"{label:22s} "
            + " ".join(f"{c:>24.4g}" if isinstance(c, float) else f"{c!s:>24s}" for c in cells)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
