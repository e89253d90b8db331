"""Benchmark: adaptive inference measured, figure by figure, against diffusers' own pipeline (issue 7).

    python scripts/bench.py --model MODEL [--backend auto|torch|rtx] [--device cuda] [--dtype bf16]
                            [--height H --width W] [--steps N] [--iterations K] [--compile auto|on|off]
                            [--precision fp8] [--new-size WxH] [--no-diffusers] [--configs NAME ...]
                            [--cache-dir DIR] --json OUT.json --plot OUT.png

MODEL is a diffusers folder, a built-in tiny model (tiny-flux, tiny-sd, tiny-sdxl) or a named real-size
architecture built with random weights and no download (flux-dev, flux-schnell, sd15, sd21, sdxl). Every configuration serves
the same request (prompt, size, steps, guidance, seed) on the same weights:

  eager               our pipeline with nothing compiled and no CUDA graphs
  diffusers_eager     diffusers' FluxPipeline / StableDiffusion(XL)Pipeline built from the modules `eager` loaded
  diffusers_compiled  the same after diffusers' regional torch.compile (compile_repeated_blocks);
                      left out on CPU unless --configs names it
  adaptive            compile with the backend's default specialization (torch: generic dynamic-shape kernels),
                      iterations 1..K: 1 = fallback/compile, later = compiled
  adaptive_graphs     the same with the denoising step captured in a CUDA graph (CUDA only)
  static              compile + eager specialization, shapes built ahead by a warm-up call at the measured shape
  static_graphs       the same with CUDA graphs (the specialization decision: static vs dynamic-shape code);
                      only when --configs names it
  graphs_resnets      adaptive_graphs with the UNet's resnet blocks compiled as regions too; opt-in
  fp8_torchao         adaptive_graphs with fp8 Linear layers through torchao (per-row scales); opt-in
  fp8_scaled_mm       the same through our own torch._scaled_mm module; opt-in
  fp8_attention       fp8_scaled_mm with FLUX's attention in fp8 too (cuDNN's sdpa_fp8); opt-in
  start               cold vs warm vs shipped start: the first image of a fresh process with an empty cache,
                      of a second fresh process reusing the cache the first one saved, and of a third with an
                      empty user folder and that cache shipped (caches/ + manifest, as prewarm.py ships it)

Each in-process configuration loads its own pipeline and compiles into empty caches (inductor, triton and the
project's cache folder), so its first call is an honest cold compile. Each call is timed between device
synchronizations; peak GPU memory is reset per configuration. Ratios are against diffusers eager and
diffusers compiled measured in the same run. Output: a table on stdout (printed last), the JSON with every figure and the environment, and
a bar chart in the style of TensorRT-RTX's adaptive-inference chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_diffusers import DIFFUSERS_CONFIGS, measure_eager_and_diffusers
from bench_report import environment, report, table, write_chart
from bench_results import (
    LABELS,
    MEASURED_OURS,
    OURS,
    ConfigResult,
    Request,
    Setup,
    Status,
    call_ours,
    final_latents,
    finish,
    free_memory,
    fresh_compile_caches,
    max_abs_diff,
    peak_memory_gib,
    rel_l2,
    reset_peak_memory,
    settle_background,
    skipped,
)
from bench_start import first_image_worker, measure_start

from pipeline import InvalidInputError, PipelineError, options
from pipeline.families import family_for
from pipeline.loading import resolve_model

logger = logging.getLogger("bench")

ALL_CONFIGS = (
    "eager",
    "diffusers_eager",
    "diffusers_compiled",
    "adaptive",
    "adaptive_graphs",
    "static",
    "static_graphs",
    "graphs_resnets",
    "graphs_background",
    "graphs_conv1x1_mm",
    "graphs_nchw",
    "graphs_flash",
    "graphs_cudnn_self",
    "fp8_torchao",
    "fp8_scaled_mm",
    "fp8_attention",
    "start",
)
OPT_IN_CONFIGS = (
    "static_graphs",
    "graphs_resnets",
    "graphs_background",
    "graphs_conv1x1_mm",
    "graphs_nchw",
    "graphs_flash",
    "graphs_cudnn_self",
    "fp8_torchao",
    "fp8_scaled_mm",
    "fp8_attention",
)  # measured only when --configs names them
NEW_SIZE_CONFIGS = (  # --new-size measured
    "adaptive",
    "adaptive_graphs",
    "graphs_resnets",
    "graphs_background",
    "graphs_conv1x1_mm",
    "graphs_nchw",
    "graphs_flash",
    "graphs_cudnn_self",
)

# ---- our other configurations (eager, measured with diffusers': bench_diffusers.py) ----------------------


def measure_ours(
    setup: Setup, name: str, reference: np.ndarray | None, latents: torch.Tensor | None = None
) -> ConfigResult:
    """Iterations 1..K of a fresh pipeline in `name`'s configuration (static: after a warm-up call)."""
    spec = OURS[name]
    options = spec.options(setup.compile_on, setup.precision)
    if spec.cuda_graphs and setup.device.type != "cuda":
        return skipped(name, "CUDA graphs need a CUDA device", options=options)
    folder = setup.config_dir(name)
    with fresh_compile_caches(folder):
        baseline = reset_peak_memory(setup.device)
        try:
            pipe, load_s = setup.load(options, folder / "cache")
        except InvalidInputError as e:
            return skipped(name, f"backend rejected the options: {e}", options=options)
        result = ConfigResult(
            name, spec.label, options=options, backend=pipe.backend.describe(), load_s=load_s
        )
        load_peak = peak_memory_gib(setup.device, baseline)
        reset_peak_memory(setup.device)
        try:
            # static: calls[0] is the warm-up that builds the measured shape ahead, then K timed calls
            count = setup.iterations + (1 if name == "static" else 0)
            images = None
            for i in range(count):
                call, images = call_ours(pipe, setup.request)
                result.calls.append(call)
                logger.info("%s: call %d/%d %.3f s", name, i + 1, count, call.seconds)
                if i == 0:
                    result.background_s, result.recapture_s = settle_background(pipe, setup)
            result.max_abs_diff = max_abs_diff(images, reference)
            result.latent_rel_l2 = rel_l2(final_latents(pipe, setup.request), latents)
            if setup.new_size and name in NEW_SIZE_CONFIGS:
                height, width = setup.new_size
                for i in range(2):
                    call, _ = call_ours(pipe, setup.request, height, width)
                    result.new_size_calls.append(call)
                    if i == 0:
                        result.new_size_background_s, _ = settle_background(pipe, setup, height, width)
                logger.info("%s: new size %dx%d first %.3f s", name, height, width, call.seconds)
            result.serving_peak_gib = peak_memory_gib(setup.device, baseline)
            result.peak_memory_gib = max(load_peak or 0.0, result.serving_peak_gib or 0.0) or None
        finally:
            finish(pipe, result)
            del pipe
            free_memory(setup.device)
    return result


# ---- command line ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width), the order the measurements use."""
    try:
        width, height = options.parse_size(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="folder, tiny-flux / tiny-sd / tiny-sdxl, or flux-dev / flux-schnell / sd15 / sd21 / sdxl",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "rtx"))
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: the pipeline's)")
    p.add_argument(
        "--precision", default=None, choices=("fp8",), help="fp8 denoiser Linear layers (dtype: --dtype)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=3, help="calls per configuration (K >= 1)")
    p.add_argument(
        "--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile (auto: on for CUDA)"
    )
    p.add_argument(
        "--new-size", type=parse_size, default=None, help="WIDTHxHEIGHT served after the K calls (adaptive)"
    )
    p.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=None, help="default: all that fit")
    p.add_argument("--no-diffusers", action="store_true", help="leave out diffusers' pipelines")
    p.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are made")
    p.add_argument("--work-dir", type=Path, default=None, help="keep per-configuration caches here")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-options", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-name", default="cold_start", help=argparse.SUPPRESS)
    return p


def selected_configs(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.configs:
        names = list(args.configs)
    else:
        names = [n for n in ALL_CONFIGS if n not in OPT_IN_CONFIGS]
        names = [n for n in names if not (n == "diffusers_compiled" and device.type == "cpu")]
    if args.no_diffusers:
        names = [n for n in names if n not in DIFFUSERS_CONFIGS]
    return names


def make_setup(args: argparse.Namespace, work_dir: Path) -> Setup:
    from pipeline.options import parse_device

    if args.iterations < 1:
        raise InvalidInputError(f"--iterations must be at least 1, got {args.iterations}")
    device = parse_device(args.device)
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    family = family_for(source)
    request = Request(
        prompt=args.prompt,
        height=args.height or family.default_size,
        width=args.width or family.default_size,
        steps=args.steps or family.default_steps,
        guidance=args.guidance if args.guidance is not None else family.default_guidance,
        seed=args.seed,
    )
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    setup = Setup(
        model_path=source.path,
        backend=args.backend,
        device=device,
        dtype=args.dtype,
        request=request,
        iterations=args.iterations,
        compile_on=compile_on,
        precision=args.precision,
        new_size=args.new_size,
        work_dir=work_dir,
    )
    return setup


def worker_argv(args: argparse.Namespace, setup: Setup) -> list[str]:
    """The arguments a first-image subprocess needs to serve the same request."""
    r = setup.request
    argv = ["--model", str(setup.model_path), "--backend", setup.backend, "--device", str(setup.device)]
    argv += ["--height", str(r.height), "--width", str(r.width), "--steps", str(r.steps)]
    argv += ["--guidance", repr(r.guidance), "--prompt", r.prompt, "--seed", str(r.seed)]
    argv += ["--iterations", str(setup.iterations), "--json", os.devnull, "--log-level", args.log_level]
    if setup.dtype:
        argv += ["--dtype", setup.dtype]
    return argv


def run(args: argparse.Namespace, work_dir: Path) -> int:
    setup = make_setup(args, work_dir)
    if args.worker_out:
        options = json.loads(args.worker_options)
        return first_image_worker(setup, options, args.cache_dir, args.worker_out, args.worker_name)

    names = selected_configs(args, setup.device)
    logger.info("configurations: %s", ", ".join(names))
    results: list[ConfigResult] = []
    reference = latents = None
    if "eager" in names or any(n in names for n in DIFFUSERS_CONFIGS):
        measured, reference, latents = measure_eager_and_diffusers(setup, names)
        results += measured
    for name in MEASURED_OURS:
        if name not in names:
            continue
        try:
            results.append(measure_ours(setup, name, reference, latents))
        except Exception as e:  # one failing configuration must not lose the others' figures
            logger.exception("%s failed", name)
            results.append(ConfigResult(name, LABELS[name], Status.FAILED, f"{type(e).__name__}: {e}"))
    if "start" in names:
        results += measure_start(setup, worker_argv(args, setup))

    data = report(setup, args.model, environment(setup.device), results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    logger.info("wrote %s", args.json)
    if args.plot and write_chart(data, results, args.plot, setup.iterations):
        logger.info("wrote %s", args.plot)
    print(table(data, results))
    return 1 if any(r.status == Status.FAILED for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        try:
            return run(args, work_dir)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
