"""Shared fixtures: the tiny random-weight models, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in tiny FLUX model (diffusers format, random weights)."""
    return make_tiny_model("tiny-flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in tiny Stable Diffusion model (diffusers format, random weights)."""
    return make_tiny_model("tiny-sd", tmp_path_factory.mktemp("models") / "tiny-sd")
