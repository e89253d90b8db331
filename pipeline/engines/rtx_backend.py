"""`backend="rtx"`: every stage as a TensorRT-RTX engine, built on first use, sharing one runtime cache.

On first use for a model and GPU: export each stage to ONNX (export/onnx_export.py; skipped while its
manifest matches), build one engine per stage for this GPU (export/engines.py; skipped while its metadata
matches), then load the engines with ONE `RuntimeCache` for all stages (pipeline/engines/rtx.py). The
runtime cache is the user's if valid, else a matching shipped one copied in (pipeline/cache.py), else fresh;
`close()` saves it. Everything lives in the model's cache folder (`ModelCache`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..cache import ModelCache, resolve_runtime_cache
from ..errors import InvalidInputError
from ..families import Family, ShapeRange
from .base import Backend, Specialization
from .rtx import RtxEngine, RuntimeCache, StaleEngineError

logger = logging.getLogger(__name__)

_TORCH_ONLY = ("compile", "precision")


def default_shape_range(family: Family) -> ShapeRange:
    """What an engine built on first use serves: half to one and a half times the model's default size
    (multiples of the family's granularity), one to four images per call."""
    g, size = family.granularity, family.default_size
    lo = max(g, (size // 2) // g * g)
    hi = (size * 3 // 2) // g * g
    return ShapeRange(min_size=(lo, lo), opt_size=(size, size), max_size=(hi, hi), max_batch=4)


class RtxBackend(Backend):
    name = "rtx"

    def __init__(
        self,
        family: Family,
        device: torch.device,
        dtype: torch.dtype,
        *,
        model_cache: ModelCache,
        specialization: str = "lazy",
        cuda_graphs: bool | None = None,
        shape_range: ShapeRange | None = None,
        targets: tuple[str, ...] = ("current",),
        weight_streaming: bool = False,
        cache_dir: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(family, device, dtype)
        unknown = [k for k, v in options.items() if v is not None and k not in _TORCH_ONLY]
        if unknown:
            raise InvalidInputError(f"unknown rtx backend options: {', '.join(unknown)}")
        ignored = [k for k in _TORCH_ONLY if options.get(k) is not None]
        if ignored:
            logger.warning("options %s apply to the torch backend only; ignored", ", ".join(ignored))
        from ..export.engines import build_engines
        from ..export.onnx_export import export_model

        self.model_cache = model_cache
        self.specialization = Specialization(specialization)
        self.shape_range = shape_range or default_shape_range(family)
        export_model(family.source, model_cache.onnx_dir, dtype=dtype)
        build = dict(targets=targets, shape_range=self.shape_range, weight_streaming=weight_streaming)
        build["refittable"] = True  # LoRA refits the denoiser and text encoders (engines/rtx_refit.py)
        paths = build_engines(family, model_cache.onnx_dir, model_cache.engine_dir, **build)

        resolve_runtime_cache(model_cache)  # copies a matching shipped cache in when the user has none
        self.runtime_cache = RuntimeCache(
            model_cache.runtime_cache_path, model_cache.platform_key, model_cache.driver_version
        )
        for name in paths:
            graphs = cuda_graphs if cuda_graphs is not None else name == family.denoiser

            def load(name: str = name, graphs: bool = graphs) -> RtxEngine:
                return RtxEngine(
                    paths[name],
                    family.stages[name],
                    cache=self.runtime_cache,
                    specialization=self.specialization,
                    cuda_graphs=graphs,
                    family=family,
                )

            try:
                self.engines[name] = load()
            except StaleEngineError as e:
                logger.info("%s; rebuilding", e)
                build_engines(
                    family, model_cache.onnx_dir, model_cache.engine_dir, stages=[name], force=True, **build
                )
                self.engines[name] = load()

    def describe(self) -> str:
        return f"rtx ({self.specialization.value} specialization)"

    def close(self) -> None:
        self.runtime_cache.save()
