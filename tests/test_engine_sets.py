"""Engines as a visible build step: `python -m pipeline --build-engines` builds what `backend="rtx"` loads,
and a missing engine set is a typed error naming that one command (checked on the CPU)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.cache import ModelCache, model_key
from pipeline.cli import main
from pipeline.engines.base import Precision
from pipeline.engines.rtx_backend import EngineSet, engine_precision
from pipeline.errors import EnginesNotBuiltError, InvalidInputError
from pipeline.families import family_for
from pipeline.loading import read_model


def test_missing_engines_name_the_one_command(tiny_flux: Path, tmp_path: Path) -> None:
    source = read_model(tiny_flux, model_id="tiny-flux")
    family = family_for(source)
    cache = ModelCache(tmp_path, model_key(source), "rtx-some-gpu")
    with pytest.raises(
        EnginesNotBuiltError,
        match=r"no bf16 TensorRT-RTX engines for text_encoder, text_encoder_2, transformer, vae_decoder of "
        r"tiny-flux .*; build them with: python -m pipeline --build-engines --model tiny-flux "
        r"\(or pass build=True to from_pretrained\)",
    ):
        EngineSet(family, cache, torch.bfloat16, None).find()
    with pytest.raises(EnginesNotBuiltError, match=r"--model tiny-flux --precision fp8 "):
        EngineSet(family, cache, torch.bfloat16, Precision.FP8).find()


def test_engine_precision_is_fp8_or_the_model_dtype() -> None:
    assert engine_precision(None, torch.float16) is None  # the model dtype alone
    assert engine_precision("fp8", torch.bfloat16) is Precision.FP8
    with pytest.raises(InvalidInputError, match="--dtype fp16"):  # one knob for the dtype
        engine_precision("fp16", torch.bfloat16)


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """The CLI sets up the package logger for a terminal; put it back for the tests that follow."""
    log, root = logging.getLogger("pipeline"), logging.getLogger()
    saved = (log.handlers[:], log.level, log.propagate, root.handlers[:])
    yield
    log.handlers[:], log.level, log.propagate, root.handlers[:] = saved


@pytest.mark.usefixtures("cli_logging")
def test_build_engines_command_builds_what_the_backend_loads(
    tiny_engines: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sd = tiny_engines["sd"]
    source, family = sd["source"], sd["family"]
    engines = EngineSet(family, ModelCache.for_model(source, "rtx", "cpu", tmp_path), torch.float32, None)
    # the session's ONNX of this model: the export step finds its manifest matching and skips; builds are real
    shutil.copytree(sd["root"] / "onnx", engines.onnx_dir)
    code = main(
        ["--build-engines", "--model", str(source.path), "--dtype", "fp32", "--device", "cpu",
         "--cache-dir", str(tmp_path), "--targets", "sm89"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "stage", "precision", "engine", "MB", "weights", "MB", "activations", "MB", "streams", "build", "s"
    ]  # fmt: skip
    assert "memory plan:" in out and "24 GB card: fits, all resident" in out
    assert "built 3 fp32 engines in" in out and str(engines.engine_dir) in out
    paths, metadata = engines.find()  # what from_pretrained(backend="rtx") loads
    assert set(paths) == set(family.stages)
    assert all(m["targets"] == ["sm89"] and m["weight_streaming"] for m in metadata.values())
    assert json.loads(paths["unet"].with_suffix(".json").read_text())["denoiser"] is True


@pytest.mark.usefixtures("cli_logging")
def test_export_cli_refuses_fp8_for_old_gpus_before_exporting(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipeline.export.cli import main as export_main

    code = export_main(
        [
            str(tiny_sd),
            "--out",
            str(tmp_path / "out"),
            "--engines",
            "--precision",
            "fp8",
            "--targets",
            "sm86,sm89",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fp8 engines need compute capability 8.9 or newer; drop sm86" in err
    assert not (tmp_path / "out" / "unet.onnx").exists()
