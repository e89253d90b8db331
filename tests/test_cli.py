"""The command line as a person uses it: images with metadata, one-line errors with exit code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.images import read_parameters

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


def test_several_images_each_with_its_own_seed_reproducible_alone(tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    common = ["--model", str(tiny_sd), *FAST, "-q", "--cache-dir", str(tmp_path / "cache")]
    assert main(["A Red Fox!", *common, "--seed", "3", "--num-images", "2", "-o", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a-red-fox-3.png", "a-red-fox-4.png"]
    assert [Image.open(folder / f"a-red-fox-{s}.png").text["seed"] for s in (3, 4)] == ["3", "4"]

    alone = tmp_path / "alone"
    assert main(["A Red Fox!", *common, "--seed", "4", "-o", str(alone)]) == 0
    again = np.asarray(Image.open(alone / "a-red-fox-4.png"), dtype=np.int16)
    second = np.asarray(Image.open(folder / "a-red-fox-4.png"), dtype=np.int16)
    assert np.abs(again - second).max() <= 1  # the same image (batched float math may round one level apart)


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1e3", "seven"])
def test_seed_outside_its_range_is_one_line_and_exit_2(
    tiny_sd: Path, tmp_path: Path, capfd, seed: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["a fox", "--model", str(tiny_sd), "--seed", seed, "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed must be a whole number in [0, 2**64)" in err[0], err


def test_last_seeds_leave_no_room_for_more_images(tiny_sd: Path, tmp_path: Path, capfd) -> None:
    args = ["a fox", "--model", str(tiny_sd), "--seed", str(2**64 - 1), "--num-images", "2"]
    assert main([*args, "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed + 1 too, for 2 images" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")]
)
def test_output_suffix_picks_the_format_with_a1111_parameters(
    tiny_sd: Path, tmp_path: Path, suffix: str, fmt: str
) -> None:
    out = tmp_path / f"fox{suffix}"
    args = ["a red fox", "--model", str(tiny_sd), *FAST, "--seed", "7", "--negative-prompt", "blurry"]
    assert main([*args, "-o", str(out), "-q", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert Image.open(out).format == fmt and Image.open(out).size == (48, 64)
    prompt, negative, fields = read_parameters(out).splitlines()
    assert (prompt, negative) == ("a red fox", "Negative prompt: blurry")
    assert fields.startswith(
        "Steps: 2, Sampler: PNDMScheduler, CFG scale: 7.5, Seed: 7, Size: 48x64, Model: "
    )


def test_unknown_output_suffix_is_one_line_not_a_folder(tiny_sd: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "fox.gif"
    assert main(["a fox", "--model", str(tiny_sd), "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".gif is not an image format" in err[0], err
    assert not out.exists()


def test_flux_images_do_not_record_the_negative_prompt_it_ignored(
    tiny_flux: Path, tmp_path: Path, capfd
) -> None:
    out = tmp_path / "fox.png"
    args = ["a red fox", "--model", str(tiny_flux), *FAST, "--seed", "1", "--negative-prompt", "blurry"]
    assert main([*args, "-o", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    text = Image.open(out).text
    assert "negative_prompt" not in text and "Negative prompt" not in text["parameters"]
    assert "CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1" in text["parameters"]
    err = capfd.readouterr().err
    assert err.count("negative prompt ignored") == 1


def test_quiet_prints_the_written_paths_and_nothing_else(tiny_sd: Path, tmp_path: Path, capfd) -> None:
    folder = tmp_path / "out"
    args = ["a fox", "--model", str(tiny_sd), *FAST, "--seed", "5", "--num-images", "2", "-q"]
    assert main([*args, "-o", str(folder) + "/", "--cache-dir", str(tmp_path / "cache")]) == 0
    captured = capfd.readouterr()
    assert captured.out.splitlines() == [str(folder / "a-fox-5.png"), str(folder / "a-fox-6.png")]
    assert captured.err == ""


def test_a_blank_prompt_is_allowed_with_one_warning(tiny_sd: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "blank.png"
    assert main(["", "--model", str(tiny_sd), *FAST, "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    assert out.is_file() and Image.open(out).text["prompt"] == ""
    assert capfd.readouterr().err.count("the prompt is blank") == 1


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


class _Stderr:
    """Everything a process writes to stderr so far, read in the background."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, marker: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no {marker!r} in {self.text!r}"
            time.sleep(0.05)

    def done(self) -> str:
        self._thread.join(30)
        return self.text


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
@pytest.mark.parametrize(
    "moment",
    [
        "importing",  # right after the start: Python is importing torch and diffusers
        "loading",  # after the backend line: weights loading
        "denoising",  # in the loop
    ],
)
def test_ctrl_c_at_any_moment_prints_interrupted_and_exits_130(
    tiny_sd: Path, tmp_path: Path, moment: str
) -> None:
    args = [sys.executable, "-m", "pipeline", "a fox", "--model", str(tiny_sd), "--steps", "400"]
    args += ["--height", "64", "--width", "64", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    # SIGINT as a terminal delivers it, even where the test runner was started in the background (a shell
    # without job control starts background jobs with SIGINT ignored, and the child would inherit that)
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    stderr = _Stderr(proc)
    if moment == "importing":
        time.sleep(0.3)
    else:
        stderr.wait_for({"loading": "backend auto ->", "denoising": "denoising:"}[moment])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, stderr.done()
    text = stderr.done()
    assert "Traceback" not in text and text.rstrip().splitlines()[-1].endswith("interrupted"), text
    assert not list(tmp_path.glob("*.png"))
