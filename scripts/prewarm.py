"""Make a prewarmed runtime / compile cache to ship with the app (see caches/README.md).

    python scripts/prewarm.py MODEL --sizes 512x512,1024x1024 [--batch 1,2] [--backend auto|rtx|torch]
                              [--steps N] [--device cuda] [--dtype float16] [--compile] --out caches/

Runs every (batch, size) through the pipeline with a fresh cache folder, closes the pipeline (which saves
its cache), copies the cache to OUT/<model-key>/<platform-key>/runtime.cache and adds its entry to
OUT/manifest.json. Sizes are WIDTHxHEIGHT. The torch backend runs with compile on (its default is off on a
CPU, where nothing would be cached). Needs the package importable (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from pipeline import Pipeline, PipelineError, options
from pipeline.cache import (
    SHIPPED_FILE,
    ShippedCache,
    atomic_write_bytes,
    blob_problem,
    platform_info,
    sha256_file,
    tool_versions,
    update_manifest,
)
from pipeline.engines import choose_backend

logger = logging.getLogger("prewarm")
BACKGROUND_TIMEOUT_S = 3600


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,1024x768' -> [(512, 512), (1024, 768)] as (width, height)."""
    try:
        return options.parse_sizes(text)
    except PipelineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a diffusers folder, a hub id, or tiny-sd / tiny-flux / tiny-sdxl")
    p.add_argument("--sizes", type=parse_sizes, required=True, help="WIDTHxHEIGHT,... to cover")
    p.add_argument("--batch", type=parse_ints, default=[1], help="images per prompt to cover (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", "rtx", "torch"])
    p.add_argument("--steps", type=int, default=2, help="denoising steps per run (shapes, not steps, matter)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    p.add_argument("--precision", choices=["fp8"], default=None, help="ship the fp8 model's cache")
    p.add_argument("--autotune", action="store_true",
                   help="torch: tune the GEMMs while compiling (max-autotune); paid here, shipped")  # fmt: skip
    p.add_argument("--compile-resnets", choices=["off", "on", "background"], default=None,
                   help="torch: the UNets' resnet blocks as compiled regions (default: the family's; "
                        "background ones are waited for here, so they ship)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("caches"), help="shipped caches folder (default caches/)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def wait_background(pipe: Pipeline) -> None:
    """Regions the torch backend compiles in the background ship too: wait for them."""
    backend = pipe.backend
    if not getattr(backend, "background_busy", False):
        return
    logger.info("waiting for the regions compiling in the background...")
    start = time.perf_counter()
    if not backend.wait_background(BACKGROUND_TIMEOUT_S):
        raise PipelineError(f"background compiles did not finish in {BACKGROUND_TIMEOUT_S} s")
    logger.info("background compiles done in %.1f s", time.perf_counter() - start)


def prewarm(args: argparse.Namespace) -> ShippedCache:
    backend = choose_backend(args.backend, options.parse_device(args.device))
    # the torch backend persists compiled code only: compile on, wherever its default is off (CPU)
    # rtx: build the engines if they are missing (a prewarm run is the place for it)
    backend_options = {"compile": True} if backend == "torch" else {"build": True}
    if args.precision:
        backend_options["precision"] = args.precision
    # torch-only options whose compiled code goes into the shipped compile cache (the app passes them too)
    for flag in ("autotune", "compile_resnets"):
        value = getattr(args, flag)
        if value:
            if backend != "torch":
                raise SystemExit(f"error: --{flag.replace('_', '-')} is a torch backend option")
            backend_options[flag] = value
    with tempfile.TemporaryDirectory(prefix="prewarm-") as tmp:
        pipe = Pipeline.from_pretrained(
            args.model,
            backend=backend,
            device=args.device,
            dtype=args.dtype,
            cache_dir=tmp,
            **backend_options,
        )
        pipe.progress = False
        shapes = []
        with pipe:
            for batch in args.batch:
                for width, height in args.sizes:
                    start = time.perf_counter()
                    pipe(
                        args.prompt,
                        height=height,
                        width=width,
                        num_inference_steps=args.steps,
                        num_images_per_prompt=batch,
                        output_type="np",
                    )
                    logger.info("batch %d, %dx%d: %.1f s", batch, width, height, time.perf_counter() - start)
                    shapes.append({"batch": batch, "height": height, "width": width})
            wait_background(pipe)
        # leaving `with` closed the pipeline, which saved its cache
        cache = pipe.model_cache
        source = cache.runtime_cache_path
        problem = blob_problem(source, cache.platform_key)
        if problem:
            why = (
                "the torch backend saves a cache of what it compiled, and compiled nothing new"
                if backend == "torch"
                else "the rtx backend saves the kernels TensorRT-RTX compiled while running"
            )
            raise PipelineError(f"the pipeline left no usable cache at {source} ({problem}): {why}")
        info = platform_info(backend, pipe.device)
        if info.key != cache.platform_key:
            raise PipelineError(f"platform key {info.key} differs from the pipeline's {cache.platform_key}")

        target = args.out / cache.model_key / cache.platform_key / SHIPPED_FILE
        atomic_write_bytes(target, source.read_bytes())  # whole or absent, even if interrupted
    tools = {**tool_versions(backend), "diffusers": metadata.version("diffusers")}
    tools["adaptive-diffusion"] = _app_version()
    entry = ShippedCache(
        model_id=pipe.source.model_id,
        model_hash=pipe.source.content_hash,
        model_key=cache.model_key,
        platform_key=cache.platform_key,
        backend=backend,
        precision=str(pipe.dtype).removeprefix("torch."),
        platform=info.fields(),
        shapes=shapes,
        tools=tools,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files={SHIPPED_FILE: {"sha256": sha256_file(target), "size": target.stat().st_size}},
    )
    update_manifest(args.out, entry)
    return entry


def _app_version() -> str:
    try:
        return metadata.version("adaptive-diffusion")
    except metadata.PackageNotFoundError:
        return "source"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        entry = prewarm(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = entry.files[SHIPPED_FILE]["size"]
    print(
        f"{args.out / entry.folder / SHIPPED_FILE}: {size} bytes, {len(entry.shapes)} shape(s), manifest updated"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
