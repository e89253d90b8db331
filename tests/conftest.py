"""Shared fixtures: the tiny random-weight models, made once per test session."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.families import Family, ShapeRange, family_for
from pipeline.loading import read_model
from pipeline.tiny import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _test_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing a test makes lands in the user's own cache folder (weight-file hashes, built-in models):
    tests that need a cache root pass their own; everything else goes to one session folder."""
    name = "ADAPTIVE_DIFFUSION_CACHE_DIR"
    before = os.environ.get(name)
    os.environ[name] = str(tmp_path_factory.mktemp("cache-root"))
    yield
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before


@pytest.fixture(autouse=True)
def _package_loggers() -> Iterator[None]:
    """The CLIs set up the `pipeline` logger for a terminal (their own handler, no propagation); put it back
    after each test, so a test that runs a CLI in-process does not hide later tests' records from caplog."""
    log = logging.getLogger("pipeline")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in tiny FLUX model (diffusers format, random weights)."""
    return make_tiny_model("tiny-flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in tiny Stable Diffusion model (diffusers format, random weights)."""
    return make_tiny_model("tiny-sd", tmp_path_factory.mktemp("models") / "tiny-sd")


def tiny_range(family: Family) -> ShapeRange:
    """The shape range tiny engines are built for: 2 to 8 times the family's granularity, batch 1-2."""
    g = family.granularity
    return ShapeRange((2 * g, 2 * g), (4 * g, 4 * g), (8 * g, 8 * g), 1, 1, 2)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in tiny Stable Diffusion XL model (diffusers format, random weights)."""
    return make_tiny_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_engines(
    tmp_path_factory: pytest.TempPathFactory, tiny_flux: Path, tiny_sd: Path, tiny_sdxl: Path
) -> dict[str, dict[str, Any]]:
    """Every stage of the tiny families, exported to ONNX once and built once for the portable targets."""
    from pipeline.export import export_model
    from pipeline.export.engines import build_engines

    out = {}
    for name, folder in (("flux", tiny_flux), ("sd", tiny_sd), ("sdxl", tiny_sdxl)):
        root = tmp_path_factory.mktemp(f"rtx-{name}")
        source = read_model(folder)
        family = family_for(source)
        export_model(source, root / "onnx")
        start = time.perf_counter()
        engines = build_engines(family, root / "onnx", root / "engines", shape_range=tiny_range(family))
        logging.getLogger(__name__).info("built %s engines in %.1f s", name, time.perf_counter() - start)
        out[name] = {"family": family, "source": source, "root": root, "engines": engines}
    return out


@pytest.fixture(scope="session")
def tiny_fp8(
    tmp_path_factory: pytest.TempPathFactory, tiny_flux: Path, tiny_sd: Path
) -> dict[str, dict[str, Any]]:
    """Each tiny denoiser as FP8 Q/DQ ONNX (Model Optimizer, calibrated on the CPU), built once for SM89 and
    SM120 with weight streaming."""
    from pipeline.export import export_model
    from pipeline.export.engine_meta import FP8_TARGETS
    from pipeline.export.engines import build_engines
    from pipeline.export.fp8 import Fp8Method
    from pipeline.export.onnx_export import Fp8Export

    out = {}
    for name, folder in (("flux", tiny_flux), ("sd", tiny_sd)):
        root = tmp_path_factory.mktemp(f"fp8-{name}")
        source = read_model(folder)
        family = family_for(source)
        size = 4 * family.granularity
        fp8 = Fp8Export(
            Fp8Method.MODELOPT, calibration_size=(size, size), calibration_prompts=2, calibration_steps=2
        )
        start = time.perf_counter()
        onnx_path = export_model(source, root / "onnx", stages=[family.denoiser], fp8=fp8)[family.denoiser]
        engines = build_engines(
            family, root / "onnx", root / "engines", stages=[family.denoiser], targets=FP8_TARGETS,
            shape_range=tiny_range(family),
        )  # fmt: skip
        logging.getLogger(__name__).info("fp8 %s: %.1f s", name, time.perf_counter() - start)
        out[name] = {
            "family": family, "source": source, "root": root, "onnx": onnx_path,
            "engine": engines[family.denoiser],
        }  # fmt: skip
    return out
