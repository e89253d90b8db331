"""`ImageService`: one loaded pipeline, its worker and its image store, and the rules of a request.

`prepare` turns a request body into a `Job` or raises `RequestError` (HTTP 400): every check is made here, in
the request handler, on the configs, before the job is queued and any GPU work is done. `render` turns a
finished job's images into PNG bytes with the metadata the CLI writes (pipeline.cli.png_metadata).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import random
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..cli import png_metadata
from ..errors import InvalidInputError
from ..images import a1111_parameters, encode_image
from ..requests import check_request
from .config import ServeConfig
from .jobs import BatchKey, BatchResult, Job
from .schemas import MAX_N, MAX_SEED, ImageRequest
from .sizes import KEEP, ServedSizes, Shape
from .store import ImageStore
from .worker import Worker

logger = logging.getLogger("pipeline.serve")

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# check_request names the pipeline's arguments; a client knows the request's fields
_PARAMS = {"height": "size", "width": "size", "num_inference_steps": "steps", "num_images_per_prompt": "n"}
MAX_LORA_SCALE = 10.0


class RequestError(InvalidInputError):
    """A request the server refuses (HTTP 400), naming the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def scheduler_choices(pipe: Any) -> tuple[str | None, list[str]]:
    """The pipeline's scheduler class name and the names it can switch to (`pipe.scheduler.compatibles`)."""
    current = getattr(pipe, "scheduler", None)
    if current is None:  # a pipeline without a settable scheduler: requests cannot choose one
        return None, []
    name = type(current).__name__
    return name, sorted({name, *(cls.__name__ for cls in current.compatibles)})


class ImageService:
    def __init__(self, pipe: Any, config: ServeConfig, replica: str | None = None) -> None:
        from ..cache import cache_root, model_key

        self.pipe = pipe
        self.config = config
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.family = pipe.family
        self.model_id = pipe.source.model_id
        self.backend = pipe.backend.describe()
        self.distilled = pipe.family.distilled_guidance  # FLUX: the guidance is distilled, not CFG
        self.device = _describe_device(pipe.device)
        self.created = int(time.time())
        self.scheduler, self.schedulers = scheduler_choices(pipe)
        self.loras = {lora.name: lora.scale for lora in config.loras}
        image_dir = config.image_dir or cache_root(config.cache_dir) / "serve-images"
        self.store = ImageStore(Path(image_dir), config.keep_images)
        warm_sizes = config.warm_sizes
        if warm_sizes is None:  # the model's native size, at its default steps: what most requests ask for
            native = self.family.default_size
            warm_sizes = ((native, native),) if native <= config.max_side else ()  # unless none may ask it
        for width, height in warm_sizes:  # refused at start, as a request of that size would be
            check_request(self.family, height, width, self.family.default_steps, 1, "np")
        served = ServedSizes(cache_root(config.cache_dir) / "serve-sizes" / f"{model_key(pipe.source)}.json")
        recent = self._servable(served.most_served(KEEP, {Shape(w, h) for w, h in warm_sizes}))
        self.worker = Worker(
            pipe,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            batch_wait=config.batch_wait,
            scheduler=self.scheduler,
            lora_names=tuple(self.loras),
            warm_sizes=warm_sizes,
            warm_recent=tuple(recent[: config.warm_recent]),
            served=served,
        )

    def _servable(self, shapes: list[Shape]) -> list[Shape]:
        """The remembered shapes a request could still ask for (the limits or the model may have changed)."""
        kept = []
        for shape in shapes:
            if max(shape.width, shape.height) > self.config.max_side or shape.images > self.config.max_batch:
                continue
            try:
                check_request(
                    self.family, shape.height, shape.width, self.family.default_steps, shape.images, "np"
                )
            except InvalidInputError:
                continue
            kept.append(shape)
        return kept

    @classmethod
    def load(cls, config: ServeConfig, replica: str | None = None) -> ImageService:
        """Load the model (and its LoRAs), start the worker."""
        from ..pipeline import Pipeline

        options = dict(config.backend_options)
        if config.scheduler is not None:
            options["scheduler"] = config.scheduler
        pipe = Pipeline.from_pretrained(
            config.model,
            backend=config.backend,
            device=config.device,
            dtype=config.dtype,
            cache_dir=config.cache_dir,
            **options,
        )
        pipe.progress = False
        if config.loras:
            if not hasattr(pipe, "load_lora_weights"):
                raise InvalidInputError("this pipeline cannot load LoRAs (it has no load_lora_weights)")
            for lora in config.loras:
                pipe.load_lora_weights(lora.path, adapter_name=lora.name)
            # all loaded, none active: a request's choice is then a scale change, never a load
            pipe.set_adapters([lora.name for lora in config.loras], adapter_weights=[0.0] * len(config.loras))
        service = cls(pipe, config, replica)
        service.worker.start()
        logger.info(
            "serving %s (%s): batches of up to %d images, %d waiting requests at most, timeout %.0f s",
            service.model_id,
            service.backend,
            config.max_batch,
            config.max_queue,
            config.timeout,
        )
        return service

    def close(self) -> None:
        """Stop the worker, then save the pipeline's compile / runtime cache (if the worker has let go)."""
        if self.worker.stop():
            self.pipe.close()
        else:
            logger.warning("the running batch did not finish in time; the compile cache was not saved")

    # ---- requests ----------------------------------------------------------------------------------
    def prepare(self, req: ImageRequest) -> Job:
        """Every check a request must pass, as a Job ready to queue; RequestError (HTTP 400) otherwise."""
        family, config = self.family, self.config
        if req.model is not None and req.model not in (self.model_id, Path(self.model_id).name):
            raise RequestError(
                f"model {req.model!r} is not served here; this server serves {self.model_id!r}",
                "model",
                "model_not_found",
            )
        width, height = self._size(req.size)
        steps = req.steps if req.steps is not None else family.default_steps
        if steps > config.max_steps:
            raise RequestError(f"steps must be at most {config.max_steps} on this server", "steps")
        try:
            check_request(family, height, width, steps, req.n, "pil")
        except InvalidInputError as e:
            raise RequestError(str(e), _PARAMS.get(str(e).split(" ", 1)[0])) from e
        max_n = min(MAX_N, config.max_batch)
        if req.n > max_n:
            raise RequestError(f"n must be at most {max_n} on this server (--max-batch)", "n")
        guidance = req.guidance_scale if req.guidance_scale is not None else family.default_guidance
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        if seed + req.n - 1 > MAX_SEED:
            raise RequestError(f"seed + n - 1 must be at most {MAX_SEED}", "seed")
        key = BatchKey(
            width, height, steps, float(guidance), self._scheduler(req.scheduler), self._lora(req.lora)
        )
        return Job(
            request_id=req.request_id or uuid.uuid4().hex,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            seeds=[seed + i for i in range(req.n)],
            key=key,
            deadline=time.monotonic() + config.timeout,
        )

    def _size(self, size: str | None) -> tuple[int, int]:
        if size is None:
            return self.family.default_size, self.family.default_size
        match = _SIZE.match(size)
        if match is None:
            raise RequestError(f'size must be "WIDTHxHEIGHT" in pixels, e.g. "512x512", got {size!r}', "size")
        width, height = int(match[1]), int(match[2])
        if max(width, height) > self.config.max_side:
            raise RequestError(
                f"size {size}: each side must be at most {self.config.max_side} pixels", "size"
            )
        return width, height

    def _scheduler(self, name: str | None) -> str | None:
        if name is None or name == self.scheduler:
            return self.scheduler
        if name not in self.schedulers:
            known = ", ".join(self.schedulers) or "none: this pipeline cannot switch schedulers"
            raise RequestError(
                f"unknown scheduler {name!r} for this model; choose one of {known}", "scheduler"
            )
        return name

    def _lora(self, lora: str | dict[str, float] | None) -> tuple[tuple[str, float], ...]:
        if lora is None:
            return ()
        chosen = {lora: self.loras.get(lora, 1.0)} if isinstance(lora, str) else dict(lora)
        for name, scale in chosen.items():
            if name not in self.loras:
                known = ", ".join(self.loras) or "none (the server loads them at start: --lora NAME=PATH)"
                raise RequestError(f"unknown LoRA {name!r}; this server has {known}", "lora")
            if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
                raise RequestError(f"LoRA scale for {name!r} must be within ±{MAX_LORA_SCALE}", "lora")
        return tuple(sorted((name, float(scale)) for name, scale in chosen.items() if scale != 0))

    # ---- answers -----------------------------------------------------------------------------------
    def render(self, job: Job, result: BatchResult, response_format: str, base_url: str) -> dict[str, Any]:
        """The response body of a finished job: PNGs (with the CLI's metadata) as base64 or as URLs."""
        s = result.settings
        settings = {
            "width": s["width"],
            "height": s["height"],
            "steps": s["num_inference_steps"],
            "guidance_scale": s["guidance_scale"],
            "scheduler": s["scheduler"],
            "lora": s["lora"],
        }
        extra: dict[str, str] = {}
        if s["lora"]:
            extra["lora"] = ",".join(f"{name}:{scale:g}" for name, scale in s["lora"].items())
        data = []
        for i, (image, seed) in enumerate(zip(result.images, job.seeds, strict=True)):
            # the batch's settings, with this job's own negative prompt where the model used one
            own = dict(
                s, negative_prompt=job.negative_prompt if s.get("negative_prompt") is not None else None
            )
            metadata = png_metadata(
                job.prompt,
                seed=seed,
                settings=own,
                model=self.model_id,
                backend=self.backend,
                index=i,
                **extra,
            )
            png = encode_image(
                image, "PNG", metadata, a1111_parameters(metadata, distilled_guidance=self.distilled)
            )
            if response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed})
            else:
                image_id = self.store.put(png)
                data.append({"url": f"{base_url.rstrip('/')}/v1/images/{image_id}.png", "seed": seed})
        return {
            "created": int(time.time()),
            "data": data,
            "size": f"{s['width']}x{s['height']}",
            "output_format": "png",
            "request_id": job.request_id,
            "settings": settings,
            "batch": {"id": result.batch_id, "images": result.batch_images},
            "replica": self.replica,
        }

    def model_card(self) -> dict[str, Any]:
        """An OpenAI model object, with what a client needs to build a valid request."""
        f = self.family
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "adaptive-diffusion",
            "family": f.name,
            "backend": self.backend,
            "device": self.device,
            "default_size": f"{f.default_size}x{f.default_size}",
            "size_multiple": f.granularity,
            "max_side": self.config.max_side,
            "default_steps": f.default_steps,
            "max_steps": self.config.max_steps,
            "default_guidance_scale": f.default_guidance,
            "max_n": min(MAX_N, self.config.max_batch),
            "scheduler": self.scheduler,
            "schedulers": self.schedulers,
            "loras": self.loras,
        }

    def health(self) -> dict[str, Any]:
        stats = self.worker.stats()
        status = "warming" if stats["warming"] else "ok"
        return {"status": status, "model": self.model_id, "replica": self.replica, **stats}


def _describe_device(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
