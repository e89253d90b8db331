"""`python -m pipeline "a red fox in the snow"`: generate images from the command line.

The CLI decides what a person sees: a progress bar over the denoising steps, a one-line timing summary (with
-q only the written paths), for any error a user can cause one line on stderr and exit code 2, and for Ctrl-C
`interrupted` and exit code 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import InvalidInputError, PipelineError
from .images import IMAGE_FORMATS, image_format, save_image

logger = logging.getLogger("pipeline")

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class _Parser(argparse.ArgumentParser):
    scheduler_action: argparse.Action | None = None

    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")

    def format_help(self) -> str:
        if (
            self.scheduler_action is not None
        ):  # listed from diffusers only when asked: importing it takes seconds
            self.scheduler_action.help = _scheduler_help()
        return super().format_help()


def _scheduler_help() -> str:
    from .schedulers import family_scheduler_names

    lists = "; ".join(f"{family}: {', '.join(names)}" for family, names in family_scheduler_names().items())
    return (
        "a diffusers scheduler compatible with the model, built from its scheduler config (default: the "
        f"model's own). {lists}"
    )


def seed_arg(text: str) -> int:
    """--seed: a whole number in [0, 2**64)."""
    from .options import parse_seed

    try:
        return parse_seed(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline", description="Text to image with FLUX.1, Stable Diffusion and SDXL."
    )
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers folder, Hugging Face hub id, or built-in tiny-flux / tiny-sd / tiny-sdxl (random weights, "
        f"noise); "
        f"default {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--height", type=int, help="pixels, a multiple of 16 (FLUX) or 8 (SD); default the model's"
    )
    p.add_argument("--width", type=int, help="pixels; default the model's")
    p.add_argument(
        "--steps", type=int, help="denoising steps (default: FLUX-dev 28, schnell 4, SD 50, SDXL 50)"
    )
    p.add_argument("--guidance-scale", type=float, help="default: FLUX-dev 3.5, schnell 0, SD 7.5, SDXL 5")
    p.add_argument(
        "--seed",
        type=seed_arg,
        help="random seed in [0, 2**64) (default: a random one); image i uses seed + i, written into it",
    )
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (image i: seed + i)")
    p.add_argument("--negative-prompt", help="what not to draw (Stable Diffusion, SDXL)")
    p.scheduler_action = p.add_argument(
        "--scheduler", metavar="NAME", help="a diffusers scheduler class name"
    )
    p.add_argument(
        "-o",
        "--output",
        help=f"an image file ({', '.join(IMAGE_FORMATS)}), or a folder (default: the current folder)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors file, folder or hub id; diffusers or kohya/A1111) and its scale "
        "(default 1); repeat to mix several",
    )
    add_engine_arguments(p)
    build = p.add_argument_group("building TensorRT-RTX engines")
    build.add_argument(
        "--build-engines",
        action="store_true",
        help="export and build the model's engines for this GPU (progress, times, sizes), then exit",
    )
    build.add_argument("--targets", help="with --build-engines: compute capabilities (default: this GPU)")
    build.add_argument("--max-size", help="with --build-engines: largest image, WIDTHxHEIGHT")
    build.add_argument(
        "--export-device",
        help="with --build-engines: where the modules are built, calibrated (fp8) and traced: cuda (default "
        "with a GPU; needs GPU memory for the model dtype's weights) or cpu (needs that much RAM)",
    )
    cache = p.add_argument_group("cache")
    cache.add_argument("--cache-info", action="store_true", help="show what is cached where, then exit")
    cache.add_argument("--clear-cache", action="store_true", help="remove what the app cached, then exit")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="print only the written paths (and errors)")
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --dtype, --cache-dir and the engine options (shared with `python -m pipeline.serve`)."""
    p.add_argument("--backend", default="auto", choices=("auto", "rtx", "torch"))
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument(
        "--cache-dir", help="cache root (default: $ADAPTIVE_DIFFUSION_CACHE_DIR or the user cache)"
    )
    engine = p.add_argument_group("engine options")
    engine.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile"
    )
    engine.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, help="CUDA graphs"
    )
    engine.add_argument(
        "--specialization", choices=("lazy", "eager", "none"), help="shape-specialized kernels"
    )
    engine.add_argument(
        "--precision",
        choices=("fp8",),
        help="fp8: the denoiser in float8 (torch: its large Linear layers; rtx: FP8 engines); the weights' "
        "dtype is --dtype",
    )
    rtx = p.add_argument_group("TensorRT-RTX memory (backend rtx)")
    rtx.add_argument(
        "--vram-budget", type=float, help="GB of GPU memory the engines may use (default: what is free)"
    )
    rtx.add_argument(
        "--low-vram",
        action="store_true",
        default=None,
        help="each stage's weights on the GPU only for its turn (text encoders released after encoding)",
    )


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(name)s: %(message)s"))
    for name in ("pipeline",):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False
    try:  # the libraries' own progress bars and notices are noise for a CLI user
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"


def output_paths(output: str | None, prompt: str, seeds: list[int]) -> list[Path]:
    """Where the images go: an image file (numbered -1, -2... when several), or a folder where each image is
    named after the prompt and its own seed. A suffix that is not an image format is an error, not a folder
    (end the path with / to mean a folder whose name has a dot)."""
    target = Path(output) if output else Path.cwd()
    count = len(seeds)
    as_folder = output is None or output.endswith(("/", os.sep)) or target.is_dir()
    if not as_folder and image_format(target) is not None:
        if count == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{i + 1}{target.suffix}") for i in range(count)]
    if not as_folder and target.suffix:
        raise InvalidInputError(
            f"-o {output}: {target.suffix} is not an image format this writes ({', '.join(IMAGE_FORMATS)}); "
            "for a folder, end it with /"
        )
    return [target / f"{_slug(prompt)}-{seed}.png" for seed in seeds]


def check_writable(paths: list[Path]) -> None:
    """Fail before generating, not after: each image's folder must exist (or be made) and take a file."""
    from .cache import ensure_writable_dir

    for folder in {p.parent for p in paths}:
        ensure_writable_dir(folder)


def png_metadata(
    prompt: str,
    *,
    seed: int,
    settings: dict[str, Any],
    model: str,
    backend: str,
    index: int = 0,
    **extra: str,
) -> dict[str, str]:
    """The text metadata of every image this project writes (CLI and server): what it takes to make the image
    again. `settings` is `PipelineOutput.settings`; a negative prompt is recorded only where it was used."""
    metadata = {
        "prompt": prompt,
        "negative_prompt": settings.get("negative_prompt") or "",
        "seed": str(seed),
        "size": f"{settings['width']}x{settings['height']}",
        "steps": str(settings["num_inference_steps"]),
        "guidance_scale": str(settings["guidance_scale"]),
        "scheduler": str(settings.get("scheduler", "")),
        "model": model,
        "backend": backend,
        "index": str(index),
        **extra,
    }
    return {k: v for k, v in metadata.items() if v != "" or k == "prompt"}


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line, as `Pipeline.from_pretrained` keywords."""
    names = ("compile", "cuda_graphs", "specialization", "precision", "vram_budget", "low_vram")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _build_command(args: argparse.Namespace) -> int:
    """`--build-engines`: the rtx engines of --model, built as a step of its own."""
    from .engines.build_cli import build_engines_command

    return build_engines_command(args)


def _cache_command(args: argparse.Namespace) -> int:
    from .cache import cache_info, cache_root, clear_cache

    root = cache_root(args.cache_dir)
    if args.clear_cache:
        removed = clear_cache(root)
        print(f"removed {len(removed)} cached item(s) from {root}")
    if args.cache_info:
        print(cache_info(root))
    return 0


def _check_loras(specs: list[str], source: Any) -> list[tuple[Any, float]]:
    """--lora PATH[:SCALE] values -> (LoraFile, scale), each checked against the model's architecture on
    weightless modules: a bad scale, a missing file or a LoRA for another model fail before weights load."""
    if not specs:
        return []
    from .lora import check_lora, parse_lora_spec

    parsed = [parse_lora_spec(spec) for spec in specs]
    return [(check_lora(path, source), scale) for path, scale in parsed]


def _load_loras(pipe: Any, loras: list[tuple[Any, float]]) -> None:
    names = []
    for i, (file, _) in enumerate(loras):
        names.append(pipe.load_lora_weights(file.path, adapter_name=f"{i}:{file.path.stem}"))
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])


def run(args: argparse.Namespace) -> int:
    if args.cache_info or args.clear_cache:
        return _cache_command(args)
    if args.build_engines:
        return _build_command(args)
    if args.prompt is None:
        raise InvalidInputError(
            'give a prompt, e.g. python -m pipeline "a red fox in the snow" --model tiny-flux'
        )

    import random

    from .families import family_for
    from .loading import resolve_model
    from .options import check_seed
    from .pipeline import Pipeline
    from .requests import check_request

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    check_seed(seed, args.num_images)
    seeds = [seed + i for i in range(max(args.num_images, 1))]
    paths = output_paths(args.output, args.prompt, seeds)
    check_writable(paths)
    # everything a user can get wrong is checked on the configs, before any weights load
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    family = family_for(source)
    height, width, steps, guidance = family.request_defaults(
        args.height, args.width, args.steps, args.guidance_scale
    )
    check_request(family, height, width, steps, args.num_images, "pil", guidance)
    loras = _check_loras(args.lora, source)

    with Pipeline.from_pretrained(
        source,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        scheduler=args.scheduler,
        **backend_options(args),
    ) as pipe:
        pipe.progress = not args.quiet
        _load_loras(pipe, loras)
        result = pipe(
            args.prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images,
            seed=seed,
        )
        model, backend = pipe.source.model_id, pipe.backend.describe()
        extra: dict[str, str] = {}
        if loras:  # each adapter: file, sha256 prefix (as A1111's LoRA hashes), scale
            extra["loras"] = json.dumps(
                [{k: a[k] for k in ("file", "sha256", "scale")} for a in pipe.lora.describe()]
            )
    for i, (image, path) in enumerate(zip(result.images, paths, strict=True)):
        metadata = png_metadata(
            args.prompt,
            seed=result.seeds[i],
            settings=result.settings,
            model=model,
            backend=backend,
            index=i,
            **extra,
        )
        save_image(image, path, metadata, distilled_guidance=family.distilled_guidance)
    t = result.timings
    if args.quiet:
        print("\n".join(map(str, paths)))
    else:
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} images in {paths[0].parent}"
        print(
            f"text encoders {t['text_encoders']:.2f} s | denoise {t['denoise']:.2f} s | "
            f"vae decoder {t['vae_decoder']:.2f} s | total {t['total']:.2f} s -> {where}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.quiet, args.verbose)
        return run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
