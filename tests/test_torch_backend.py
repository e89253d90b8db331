"""The torch backend: options, compiled regions equal the eager path, the compile cache survives processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import load_blob
from pipeline.errors import InvalidInputError
from pipeline.pipeline import Pipeline

KW = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}


def _images(pipe: Pipeline) -> np.ndarray:
    pipe.progress = False
    return pipe("a cat", generator=torch.Generator().manual_seed(0), **KW).images


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, "unknown torch backend option"),
        ({"specialization": "sometimes"}, "specialization must be one of"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"precision": "fp8"}, "fp8"),
        ({"cuda_graphs": True}, "cuda_graphs needs a CUDA device"),
        ({"compile": "yes"}, "must be true or false"),
    ],
)
def test_options_are_validated(tiny_sd: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, **options)


def test_cpu_defaults_are_eager_and_expose_the_model_cache(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    assert pipe.backend.describe().startswith("torch (eager")
    assert pipe.backend.model_cache.runtime_cache_path.is_relative_to(tmp_path)


WARM = """
import json, sys, torch
from torch._dynamo.utils import counters
from pipeline.pipeline import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1], backend="torch", device="cpu", dtype=torch.float32,
                                cache_dir=sys.argv[2], compile=True, specialization="none")
pipe.progress = False
images = pipe("a cat", generator=torch.Generator().manual_seed(0), height=32, width=32,
              num_inference_steps=2, output_type="np").images
json.dump({"artifacts": pipe.backend.stats.cache_artifacts,
           "hits": counters["inductor"]["fxgraph_cache_hit"],
           "max": float(abs(images).max())}, open(sys.argv[3], "w"))
"""


@pytest.mark.slow
def test_compiled_equals_eager_and_cache_warms_a_second_process(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor1"))
    eager_pipe = Pipeline.from_pretrained(
        tiny_sd, backend="torch", device="cpu", dtype=torch.float32, cache_dir=tmp_path
    )
    eager = _images(eager_pipe)
    # a garbage cache file where the compile cache belongs: survived with one warning, then replaced
    cache = eager_pipe.model_cache.runtime_cache_path
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not a cache" * 100)
    pipe = Pipeline.from_pretrained(
        tiny_sd,
        backend="torch",
        device="cpu",
        dtype=torch.float32,
        cache_dir=tmp_path,
        compile=True,
        specialization="none",
    )
    assert any("cache" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    compiled = _images(pipe)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    pipe.close()
    assert pipe.backend.model_cache.runtime_cache_path == cache
    assert load_blob(cache, pipe.model_cache.platform_key)  # replaced by a valid cache

    # a second process with an empty Inductor folder starts from our cache file
    out = tmp_path / "warm.json"
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor2")}
    subprocess.run([sys.executable, "-c", WARM, str(tiny_sd), str(tmp_path), str(out)], check=True, env=env)
    warm = json.loads(out.read_text())
    assert warm["artifacts"] > 0
    assert warm["hits"] > 0


def test_default_specialization_is_none_and_lazy_is_an_option() -> None:
    """The measured winner on the H100 (generic kernels as fast as specialized ones) is the default."""
    from pipeline.engines.base import Specialization
    from pipeline.engines.torch_engine import TorchOptions

    cpu = torch.device("cpu")
    assert TorchOptions.parse(cpu, {}).specialization is Specialization.NONE
    assert TorchOptions.parse(cpu, {"specialization": "lazy"}).specialization is Specialization.LAZY


def test_compiled_call_during_a_background_trace_runs_instead_of_raising() -> None:
    """A lazy specialization traces in another thread; a compiled call meanwhile must still run."""
    import torch.fx._symbolic_trace as symbolic_trace

    from pipeline.engines.torch_compile import configure_dynamo

    configure_dynamo()
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    previous = symbolic_trace._is_fx_tracing_flag
    symbolic_trace._is_fx_tracing_flag = True  # what a trace in another thread leaves set
    try:
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0))
    finally:
        symbolic_trace._is_fx_tracing_flag = previous


@pytest.mark.slow
def test_compiled_flux_equals_eager(tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32, "cache_dir": tmp_path}
    request = {**KW, "max_sequence_length": 32}
    images = []
    for options in ({}, {"compile": True}):
        pipe = Pipeline.from_pretrained(tiny_flux, **kwargs, **options)
        pipe.progress = False
        images.append(pipe("a cat", generator=torch.Generator().manual_seed(0), **request).images)
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)


@pytest.mark.slow
def test_compiled_sdxl_equals_eager(tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regional compile of the SDXL UNet (added conditioning inputs) and the guidance-rescaled step."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32, "cache_dir": tmp_path}
    request = {**KW, "negative_prompt": "a dog", "guidance_rescale": 0.7}
    images = []
    for options in ({}, {"compile": True}):
        pipe = Pipeline.from_pretrained(tiny_sdxl, **kwargs, **options)
        pipe.progress = False
        images.append(pipe("a cat", generator=torch.Generator().manual_seed(0), **request).images)
    assert pipe.backend.regions["unet"].count > 0
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)
