"""`python -m pipeline.serve --model M`: serve one model over HTTP (uvicorn), or on Ray Serve with --ray.

Bad arguments: one line on stderr and exit code 2, as the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..cli import EXIT_USER_ERROR, _Parser, _setup_logging, add_engine_arguments, backend_options
from ..errors import InvalidInputError, PipelineError
from .config import LoraSpec, ServeConfig, parse_warm_sizes

logger = logging.getLogger("pipeline.serve")

GRACE_S = 5  # on SIGINT / SIGTERM, requests in flight have this long; then their connections are closed


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline.serve", description="Serve a text-to-image model over HTTP.")
    p.add_argument(
        "--model", required=True, help="diffusers folder, hub id, tiny-flux / tiny-sd, flux-dev..."
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    add_engine_arguments(p)
    p.add_argument(
        "--scheduler", help="default scheduler class name (requests may pick another compatible one)"
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH[:SCALE]",
        help="a LoRA to load at start (repeatable); requests select it by NAME",
    )
    s = p.add_argument_group("service")
    d = ServeConfig.__dataclass_fields__
    s.add_argument(
        "--max-queue", type=int, default=d["max_queue"].default, help="waiting requests; more get 429"
    )
    s.add_argument("--max-batch", type=int, default=d["max_batch"].default, help="images per pipeline call")
    s.add_argument(
        "--batch-wait",
        type=float,
        default=d["batch_wait"].default,
        help="seconds to wait for same-shape requests",
    )
    s.add_argument(
        "--timeout", type=float, default=d["timeout"].default, help="seconds per request, queue included"
    )
    s.add_argument("--image-dir", help="where url images are kept (default: <cache root>/serve-images)")
    s.add_argument("--keep-images", type=int, default=d["keep_images"].default, help="url images kept")
    s.add_argument("--max-side", type=int, default=d["max_side"].default, help="largest width or height")
    s.add_argument("--max-steps", type=int, default=d["max_steps"].default)
    s.add_argument(
        "--warm-size",
        action="append",
        metavar="WxH",
        help="serve this size once before the first request (repeatable): its first request runs at full speed "
        "(default: the model's native size; 'none': no warm-up)",
    )
    s.add_argument(
        "--warm-recent",
        type=int,
        default=d["warm_recent"].default,
        metavar="N",
        help="after a restart, warm up the N sizes this model's server served most, while no request waits "
        "(default: %(default)s; 0: none)",
    )
    r = p.add_argument_group("Ray Serve (pip install 'adaptive-diffusion[serve-ray]')")
    r.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment, one replica per GPU")
    r.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    r.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    r.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    r.add_argument(
        "--ray-address",
        default="local",
        help="'local' (a new Ray instance, the default), 'auto' (the cluster `ray start` made), or ray://HOST:PORT",
    )
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="errors only")
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        backend_options=backend_options(args),
        scheduler=args.scheduler,
        loras=tuple(LoraSpec.parse(text) for text in args.lora),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait=args.batch_wait,
        timeout=args.timeout,
        image_dir=args.image_dir,
        keep_images=args.keep_images,
        max_side=args.max_side,
        max_steps=args.max_steps,
        warm_sizes=parse_warm_sizes(args.warm_size),
        warm_recent=args.warm_recent,
    )


def _require(*modules: str, extra: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInputError(
            f"{', '.join(missing)} not installed: pip install 'adaptive-diffusion[{extra}]'"
        )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    _require("fastapi", "uvicorn", extra="serve")
    if args.ray:
        _require("ray", extra="serve-ray")
        from .ray_app import Scaling, run_ray

        scaling = Scaling.from_args(args.replicas, args.min_replicas, args.max_replicas)
        return run_ray(config, scaling, host=args.host, port=args.port, address=args.ray_address)

    import uvicorn

    from .app import create_app
    from .service import ImageService

    service = ImageService.load(config)
    logger.info(
        "listening on http://%s:%d (web page at /, API at /v1/images/generations)", args.host, args.port
    )
    level = "info" if args.verbose else "warning"
    uvicorn.run(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level=level,
        timeout_graceful_shutdown=GRACE_S,
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
        return 0


if __name__ == "__main__":
    sys.exit(main())
