"""`--lora PATH[:SCALE]` on the command line: images change, PNGs record each adapter, bad input is one line
and exit code 2 before any weights load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from lora_files import make_loras
from PIL import Image

from pipeline.cli import main

FAST = ["--height", "32", "--width", "32", "--steps", "2", "--backend", "torch", "--device", "cpu"]


@pytest.fixture(scope="module")
def loras(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_loras(tiny_sd, tmp_path_factory.mktemp("cli-lora"), "sd")


def run(model: Path, out: Path, *extra: str) -> int:
    return main(["a red fox", "--model", str(model), *FAST, "--seed", "3", "-o", str(out), "-q", *extra])


def test_loras_change_the_image_and_are_recorded(tiny_sd: Path, loras: dict, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run(tiny_sd, tmp_path / "plain.png", *cache) == 0
    spec = ["--lora", str(loras["peft"]), "--lora", f"{loras['kohya']}:0.6"]
    assert run(tiny_sd, tmp_path / "lora.png", *spec, *cache) == 0
    plain, styled = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "lora.png")
    assert "loras" not in plain.text
    assert np.abs(np.asarray(plain, dtype=float) - np.asarray(styled, dtype=float)).max() > 10
    recorded = json.loads(styled.text["loras"])
    assert recorded == [
        {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:10], "scale": s}
        for p, s in ((loras["peft"], 1.0), (loras["kohya"], 0.6))
    ]


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("{peft}:abc", "the scale must be a number >= 0"),
        ("{peft}:-1", "the scale must be a finite number >= 0"),
        ("{peft}:nan", "the scale must be a finite number >= 0"),
        ("{tmp}/missing.safetensors", "does not exist"),
        ("{flux}", "another architecture"),
    ],
    ids=["not-a-number", "negative", "nan", "missing-file", "other-architecture"],
)
def test_bad_lora_is_one_line_and_exit_2(
    tiny_sd: Path,
    tiny_flux: Path,
    loras: dict,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    lora: str,
    message: str,
) -> None:
    flux = make_loras(tiny_flux, tmp_path, "flux")["peft"] if "{flux}" in lora else None
    spec = lora.format(peft=loras["peft"], tmp=tmp_path, flux=flux)

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the LoRA was checked")

    monkeypatch.setattr("pipeline.loading.ModelSource.load_component", no_weights)
    code = run(tiny_sd, tmp_path / "x.png", "--lora", spec, "--cache-dir", str(tmp_path / "cache"))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.png").exists()
