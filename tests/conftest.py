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
