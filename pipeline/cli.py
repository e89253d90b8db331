"""`python -m pipeline "a red fox in the snow"`: generate images from the command line.

The CLI decides what a person sees: a progress bar over the denoising steps, a one-line timing summary, and
for any error a user can cause one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import InvalidInputError, OutputError, PipelineError

logger = logging.getLogger("pipeline")

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline", description="Text to image with FLUX.1 and Stable Diffusion.")
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers folder, Hugging Face hub id, or built-in tiny-flux / tiny-sd (random weights, noise); "
        f"default {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--height", type=int, help="pixels, a multiple of 16 (FLUX) or 8 (SD); default the model's"
    )
    p.add_argument("--width", type=int, help="pixels; default the model's")
    p.add_argument("--steps", type=int, help="denoising steps (default: FLUX-dev 28, schnell 4, SD 50)")
    p.add_argument("--guidance-scale", type=float, help="default: FLUX-dev 3.5, schnell 0, SD 7.5")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, written into the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--negative-prompt", help="what not to draw (Stable Diffusion)")
    p.add_argument("-o", "--output", help="a .png file, or a folder (default: the current folder)")
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
        choices=("bf16", "fp16", "fp32", "fp8"),
        help="torch: compute precision; rtx: fp8 engines (denoiser in FP8) or the model dtype's",
    )
    rtx = p.add_argument_group("TensorRT-RTX (backend rtx)")
    rtx.add_argument(
        "--build-engines",
        action="store_true",
        help="export and build the model's engines for this GPU (progress, times, sizes), then exit",
    )
    rtx.add_argument("--targets", help="with --build-engines: compute capabilities (default: this GPU)")
    rtx.add_argument("--max-size", help="with --build-engines: largest image, WIDTHxHEIGHT")
    rtx.add_argument(
        "--export-device",
        help="with --build-engines: where the modules are built, calibrated (fp8) and traced: cuda (default "
        "with a GPU; needs GPU memory for the model dtype's weights) or cpu (needs that much RAM)",
    )
    rtx.add_argument(
        "--vram-budget", type=float, help="GB of GPU memory the engines may use (default: what is free)"
    )
    rtx.add_argument(
        "--low-vram",
        action="store_true",
        default=None,
        help="each stage's weights on the GPU only for its turn (text encoders released after encoding)",
    )
    cache = p.add_argument_group("cache")
    cache.add_argument("--cache-info", action="store_true", help="show what is cached where, then exit")
    cache.add_argument("--clear-cache", action="store_true", help="remove what the app cached, then exit")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


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


def output_paths(output: str | None, prompt: str, seed: int, count: int) -> list[Path]:
    """Where the images go: a .png file (numbered -1, -2... when several), or a folder with predictable names."""
    target = Path(output) if output else Path.cwd()
    if target.suffix.lower() == ".png":
        if count == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{i + 1}.png") for i in range(count)]
    stem = f"{_slug(prompt)}-{seed}"
    return [target / (f"{stem}.png" if count == 1 else f"{stem}-{i + 1}.png") for i in range(count)]


def check_writable(paths: list[Path]) -> None:
    """Fail before generating, not after: each image's folder must exist (or be made) and take a file."""
    from .cache import ensure_writable_dir

    for folder in {p.parent for p in paths}:
        ensure_writable_dir(folder)


def save_png(image: Any, path: Path, metadata: dict[str, str]) -> None:
    """Write a PNG with text metadata, atomically (temp file in the same folder, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    from .cache import atomic_write_bytes

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    try:
        atomic_write_bytes(path, buffer.getbuffer())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
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


def run(args: argparse.Namespace) -> int:
    if args.cache_info or args.clear_cache:
        return _cache_command(args)
    if args.build_engines:
        return _build_command(args)
    if not args.prompt:
        raise InvalidInputError(
            'give a prompt, e.g. python -m pipeline "a red fox in the snow" --model tiny-flux'
        )

    import random

    from .families import family_for
    from .loading import resolve_model
    from .pipeline import Pipeline, check_request

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    paths = output_paths(args.output, args.prompt, seed, args.num_images)
    check_writable(paths)
    # everything a user can get wrong is checked on the configs, before any weights load
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    family = family_for(source)
    steps = args.steps if args.steps is not None else family.default_steps
    height = family.default_size if args.height is None else args.height
    width = family.default_size if args.width is None else args.width
    check_request(family, height, width, steps, args.num_images, "pil")

    with Pipeline.from_pretrained(
        source,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        **_backend_options(args),
    ) as pipe:
        pipe.progress = not args.quiet
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
        settings = result.settings
        metadata = {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt or "",
            "seed": str(seed),
            "size": f"{settings['width']}x{settings['height']}",
            "steps": str(settings["num_inference_steps"]),
            "guidance_scale": str(settings["guidance_scale"]),
            "model": pipe.source.model_id,
            "backend": pipe.backend.describe(),
        }
    for i, (image, path) in enumerate(zip(result.images, paths, strict=True)):
        save_png(image, path, dict(metadata, index=str(i)))
    t = result.timings
    if not args.quiet:
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} images in {paths[0].parent}"
        print(
            f"text encoders {t['text_encoders']:.2f} s | denoise {t['denoise']:.2f} s | "
            f"vae decoder {t['vae_decoder']:.2f} s | total {t['total']:.2f} s -> {where}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    try:
        return run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
