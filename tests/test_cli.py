"""The command line as a person uses it: images with metadata, one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main

FAST = ["--height", "64", "--width", "48", "--steps", "2", "--backend", "torch", "--device", "cpu"]


def test_generates_png_with_metadata(tiny_sd: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fox.png"
    code = main(
        [
            "a red fox",
            "--model",
            str(tiny_sd),
            *FAST,
            "--seed",
            "7",
            "-o",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    image = Image.open(out)
    assert image.size == (48, 64)
    meta = image.text
    assert meta["prompt"] == "a red fox"
    assert meta["seed"] == "7"
    assert meta["size"] == "48x64"
    assert meta["steps"] == "2"
    assert meta["guidance_scale"] == "7.5"
    assert meta["model"] == str(tiny_sd)
    assert meta["backend"].startswith("torch")
    summary = capsys.readouterr().out
    assert "denoise" in summary and "total" in summary and str(out) in summary


def test_several_images_into_a_folder_with_predictable_names(tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    code = main(
        [
            "A Red Fox!",
            "--model",
            str(tiny_sd),
            *FAST,
            "--seed",
            "3",
            "--num-images",
            "2",
            "-o",
            str(folder),
            "-q",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a-red-fox-3-1.png", "a-red-fox-3-2.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "60"], "multiple of 8"),
        (["--steps", "0"], "at least 1"),
        (["--num-images", "0"], "at least 1"),
        (["--width", "0"], "multiple of 8"),
        (["--backend", "gpu"], "invalid choice"),
        (["--model", "/no/such/folder"], "neither a folder"),
        (["-o", "/proc/x/y.png"], "cannot write"),
        (["--scheduler", "Euler"], "unknown scheduler 'Euler' for this model; choose one of DDIMScheduler"),
        (["--scheduler", "DPMSolverSDEScheduler"], "needs torchsde"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_sd: Path, tmp_path: Path, capfd, args: list[str], message: str
) -> None:
    out_dir = tmp_path / "out"
    base = [
        "a fox",
        "--model",
        str(tiny_sd),
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "-o",
        str(out_dir / "a.png"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--backend",
        "torch",
    ]
    with pytest.raises(SystemExit) if args[0] == "--backend" else _no_raise():
        code = main([*base, *args])
        assert code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_help_lists_the_schedulers(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flux: FlowMatchEulerDiscreteScheduler;" in text
    assert "EulerAncestralDiscreteScheduler" in text and "DPMSolverSDEScheduler (needs torchsde)" in text


def test_a_stochastic_scheduler_is_reproduced_by_its_seed(tiny_sd: Path, tmp_path: Path) -> None:
    """Euler Ancestral draws noise every step, from the generator the seed makes: same seed, same PNG."""
    args = ["a red fox", "--model", str(tiny_sd), *FAST, "--scheduler", "EulerAncestralDiscreteScheduler"]
    args += ["--cache-dir", str(tmp_path / "cache"), "-q"]
    for name, seed in (("a.png", "7"), ("b.png", "7"), ("c.png", "8")):
        assert main([*args, "--seed", seed, "-o", str(tmp_path / name)]) == 0
    a, b, c = (Image.open(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    assert a.text["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert a.tobytes() == b.tobytes() != c.tobytes()


def test_folder_that_is_not_a_model(tmp_path: Path, capfd) -> None:
    assert main(["a fox", "--model", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "no model_index.json" in capfd.readouterr().err


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, ADAPTIVE_DIFFUSION_CACHE_DIR=str(tmp_path / "cache"), **env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_readme_first_command_on_a_fresh_machine(tmp_path: Path) -> None:
    """`python -m pipeline "a red fox in the snow" --model tiny-flux`: makes the tiny model, writes a PNG."""
    result = _run(["a red fox in the snow", "--model", "tiny-flux", "--steps", "4"], tmp_path)
    assert result.returncode == 0, result.stderr
    pngs = list(tmp_path.glob("a-red-fox-in-the-snow-*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 64)
    assert "backend" in result.stderr  # the one line saying which backend and why


def test_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    result = _run(["a fox", "--model", "someone/some-model"], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hub" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
