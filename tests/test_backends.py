"""Choosing a backend, and the rtx backend end to end where a GPU TensorRT-RTX runs on exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import BackendUnavailableError, EnginesNotBuiltError, InvalidInputError, Pipeline
from pipeline.engines import choose_backend
from pipeline.engines.rtx import rtx_supported
from pipeline.engines.rtx_backend import default_shape_range
from pipeline.families import family_for
from pipeline.loading import read_model

RTX_OK, RTX_WHY = rtx_supported()


def test_auto_picks_torch_on_cpu_and_says_why(caplog) -> None:
    with caplog.at_level("INFO", logger="pipeline"):
        assert choose_backend("auto", torch.device("cpu")) == "torch"
    assert any("backend auto -> torch" in r.getMessage() for r in caplog.records)


def test_rtx_refused_clearly_where_it_cannot_run() -> None:
    with pytest.raises(BackendUnavailableError, match="use --backend torch"):
        choose_backend("rtx", torch.device("cpu"))
    with pytest.raises(InvalidInputError, match="unknown backend"):
        choose_backend("tensorrt", torch.device("cpu"))


def test_the_torch_backend_runs_where_tensorrt_rtx_is_not_installed(tiny_sd: Path, tmp_path: Path) -> None:
    """The GPU machines without TensorRT-RTX (Hopper, datacenter) import every rtx module and load torch: a
    name that exists only when the library imports (TrtLogger) must not be imported at module level."""
    code = (
        "import sys; sys.modules['tensorrt_rtx'] = None\n"
        "import pipeline.engines.rtx_backend, pipeline.engines.rtx_engine, pipeline.engines.rtx_refit\n"
        "from pipeline import BackendUnavailableError, Pipeline\n"
        f"pipe = Pipeline.from_pretrained({str(tiny_sd)!r}, backend='auto', device='cpu', cache_dir={str(tmp_path)!r})\n"
        "assert pipe.backend.name == 'torch', pipe.backend.name\n"
        "try:\n"
        f"    Pipeline.from_pretrained({str(tiny_sd)!r}, backend='rtx', device='cpu', cache_dir={str(tmp_path)!r})\n"
        "except BackendUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout
    # building engines there: one line and exit 2 before minutes of ONNX export, not a traceback after them
    build = (
        "import runpy, sys; sys.modules['tensorrt_rtx'] = None\n"
        f"sys.argv = ['pipeline', '--build-engines', '--model', {str(tiny_sd)!r}, '--targets', 'sm89',"
        f" '--cache-dir', {str(tmp_path)!r}]\n"
        "runpy.run_module('pipeline', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs TensorRT-RTX" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("*.onnx"))
    # the export CLI's --engines likewise, before its export
    out = tmp_path / "onnx"
    export = (
        "import sys; sys.modules['tensorrt_rtx'] = None\n"
        "from pipeline.export.cli import main\n"
        f"sys.exit(main([{str(tiny_sd)!r}, '--out', {str(out)!r}, '--engines', '--targets', 'sm89']))\n"
    )
    done = subprocess.run([sys.executable, "-c", export], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs TensorRT-RTX" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()  # nothing exported


def test_first_use_engine_range_covers_the_default_size(tiny_flux: Path, tiny_sd: Path) -> None:
    for folder in (tiny_flux, tiny_sd):
        family = family_for(read_model(folder))
        r = default_shape_range(family)
        g = family.granularity
        assert r.min_size[0] <= family.default_size == r.opt_size[0] <= r.max_size[0]
        assert all(v % g == 0 for v in (*r.min_size, *r.max_size))


@pytest.mark.rtx
@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY)
@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux"])
def test_rtx_pipeline_matches_torch(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = request.getfixturevalue(model)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "seed": 1, "output_type": "np"}
    with pytest.raises(EnginesNotBuiltError, match="python -m pipeline --build-engines --model"):
        Pipeline.from_pretrained(folder, backend="rtx", dtype=torch.float16, cache_dir=tmp_path)
    with Pipeline.from_pretrained(
        folder, backend="rtx", dtype=torch.float16, cache_dir=tmp_path, build=True
    ) as rtx:
        ours = rtx("a red fox", **kwargs).images
    assert (rtx.model_cache.runtime_cache_path).is_file()  # saved at close
    torch_pipe = Pipeline.from_pretrained(folder, backend="torch", dtype=torch.float16, cache_dir=tmp_path)
    ref = torch_pipe("a red fox", **kwargs).images
    assert np.abs(ours - ref).max() < 2e-2


@pytest.mark.rtx
@pytest.mark.skipif(not RTX_OK, reason=RTX_WHY)
def test_rtx_fp8_low_vram_with_a_budget(tiny_sd: Path, tmp_path: Path) -> None:
    """fp8 engines, stages cycled through the GPU, the denoiser streaming its weights: the same image
    within fp8 of the torch pipeline."""
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "seed": 1, "output_type": "np"}
    free, _ = torch.cuda.mem_get_info()
    options = {"precision": "fp8", "low_vram": True, "vram_budget": min(free / 1e9, 2.0), "build": True}
    with Pipeline.from_pretrained(
        tiny_sd, backend="rtx", dtype=torch.float16, cache_dir=tmp_path, **options
    ) as rtx:
        ours = rtx("a red fox", **kwargs).images
        assert "low VRAM" in rtx.backend.describe()
    ref = Pipeline.from_pretrained(tiny_sd, backend="torch", dtype=torch.float16, cache_dir=tmp_path)
    assert np.abs(ours - ref("a red fox", **kwargs).images).max() < 5e-2
