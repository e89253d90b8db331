"""The same app as a Ray Serve deployment: one replica per GPU, each a whole `ImageService` (model, queue,
batching), Ray's proxy spreading requests over the replicas.

    python -m pipeline.serve --ray --model flux-dev --replicas 8           # one host, 8 GPUs
    python -m pipeline.serve --ray --model flux-dev --min-replicas 1 --max-replicas 8
    serve run pipeline.serve.ray_app:build model=flux-dev replicas=8       # Ray's own CLI, same app

On CUDA each replica asks Ray for one GPU (`num_gpus=1`), so Ray places at most one replica per GPU, on any
host of the cluster; elsewhere each takes one CPU. A replica answers with its id in `X-Replica` and in the body
(`replica`). Ray's router keeps at most `max_queue + max_batch` requests on a replica and holds the rest, so
the replica's own queue can still batch same-shape requests.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from .config import LoraSpec, ServeConfig, parse_warm_sizes

logger = logging.getLogger("pipeline.serve")

APP_NAME = "adaptive-diffusion"


@dataclass(frozen=True)
class Scaling:
    """A fixed number of replicas, or autoscaling between bounds."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None

    @classmethod
    def from_args(cls, replicas: int, min_replicas: int | None, max_replicas: int | None) -> Scaling:
        if (min_replicas is None) != (max_replicas is None):
            raise InvalidInputError("give both --min-replicas and --max-replicas, or neither")
        if min_replicas is not None and max_replicas is not None and not 0 <= min_replicas <= max_replicas:
            raise InvalidInputError("need 0 <= --min-replicas <= --max-replicas, and --max-replicas >= 1")
        if replicas < 1 or (max_replicas is not None and max_replicas < 1):
            raise InvalidInputError("--replicas and --max-replicas must be at least 1")
        return cls(replicas, min_replicas, max_replicas)

    def options(self, max_batch: int) -> dict[str, Any]:
        if self.max_replicas is None:
            return {"num_replicas": self.replicas}
        # a replica is "busy" with about a batch of requests in flight; more than that: add one
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas or 0, 1),
                "target_ongoing_requests": max_batch,
            }
        }


def _uses_gpu(config: ServeConfig) -> bool:
    import ray

    if config.device is not None:
        return config.device.startswith("cuda")
    return ray.cluster_resources().get("GPU", 0) > 0


def build_app(config: ServeConfig, scaling: Scaling = Scaling()) -> Any:
    """The Ray Serve application (bind it with serve.run)."""
    from ray import serve

    def build_asgi() -> Any:  # runs in each replica, once its process exists
        from .app import create_app
        from .service import ImageService

        replica = serve.get_replica_context().replica_tag
        return create_app(ImageService.load(config, replica=replica))

    gpu = _uses_gpu(config)
    deployment = serve.deployment(
        serve.ingress(build_asgi)(),
        name="ImageService",
        ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": 1},
        max_ongoing_requests=config.max_queue + config.max_batch,
        **scaling.options(config.max_batch),
    )
    logger.info("Ray Serve deployment: %s, %s per replica", scaling, "1 GPU" if gpu else "1 CPU")
    return deployment.bind()


def run_ray(config: ServeConfig, scaling: Scaling, *, host: str, port: int, address: str) -> int:
    """Start (or join) Ray, deploy, serve until SIGINT / SIGTERM, then shut Serve and Ray down."""
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config, scaling), name=APP_NAME, route_prefix="/")
        logger.info("Ray Serve on http://%s:%d (web page at /)", host, port)
        stop.wait()
        logger.info("stopping Ray Serve")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def build(args: dict[str, str]) -> Any:
    """`serve run pipeline.serve.ray_app:build model=M [replicas=N | min_replicas=A max_replicas=B] [KEY=VALUE]`
    where KEY is a ServeConfig field (device, backend, dtype, max_batch, max_queue, timeout, ...) and
    loras=NAME=PATH:SCALE,NAME=PATH, warm_sizes=WxH,WxH (or none)."""
    args = dict(args)
    scaling = Scaling.from_args(
        int(args.pop("replicas", 1)),
        int(args["min_replicas"]) if "min_replicas" in args else None,
        int(args["max_replicas"]) if "max_replicas" in args else None,
    )
    args.pop("min_replicas", None)
    args.pop("max_replicas", None)
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    values: dict[str, Any] = {}
    for name, text in args.items():
        if name == "loras":
            values["loras"] = tuple(LoraSpec.parse(item) for item in text.split(","))
        elif name == "warm_sizes":
            values["warm_sizes"] = parse_warm_sizes(text.split(","))
        elif name not in fields or name == "backend_options":
            raise InvalidInputError(f"unknown argument {name!r}; use ServeConfig's field names")
        else:
            default = fields[name].default
            values[name] = type(default)(text) if isinstance(default, int | float) else text
    return build_app(ServeConfig(**values), scaling)
