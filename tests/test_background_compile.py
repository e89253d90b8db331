"""Regions compiled in a worker process (background_compile.py): what lands serves like the eager block and is
merged into the model's cache file; a worker that fails says so and leaves its kinds eager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.engines.background_compile import BackgroundCompiler, meta_copy
from pipeline.engines.compile_cache import load_store
from pipeline.engines.region_artifacts import deserialize
from pipeline.engines.torch_compile import configure_dynamo

PLATFORM = "torch-test"


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return torch.nn.functional.gelu(self.fc(x)) * scale


class Unbroken(Mlp):
    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        torch._dynamo.graph_break()  # fullgraph=True refuses it: the worker's compile fails
        return self.fc(x) * scale


def _compiler(tmp_path: Path) -> BackgroundCompiler:
    return BackgroundCompiler(
        device=torch.device("cpu"),
        dynamic=True,
        options={},
        cache_path=tmp_path / "model.cache",
        platform_key=PLATFORM,
        meta={"kind": "torch-compile"},
    )


def test_meta_copy_keeps_layouts_and_drops_weights_and_hooks() -> None:
    block = Mlp()
    block.forward = lambda *a, **k: None  # a compile hook, as wrap_regions installs
    clone = meta_copy(block)
    assert "forward" not in clone.__dict__
    assert clone.fc.weight.is_meta and clone.fc.weight.shape == block.fc.weight.shape
    assert isinstance(clone.fc.weight, nn.Parameter) and not block.fc.weight.is_meta


def test_worker_compiles_into_the_cache_file_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the worker unpickles this file's blocks
    torch.manual_seed(0)
    configure_dynamo()
    good, bad = Mlp().eval(), Unbroken().eval()
    for block in (good, bad):
        block._class_forward = type(block).forward  # as wrap_regions keeps it
    x = torch.randn(3, 8)
    background = _compiler(tmp_path)
    try:
        background.submit("mlp", good, (x,), {"scale": 2.0})
        background.submit("mlp", good, (x,), {"scale": 2.0})  # once per group and input layouts
        background.submit("mlp", good, (torch.randn(5, 8),), {"scale": 2.0})  # another size: a job
        background.submit("unbroken", bad, (x,), {})
        assert background.busy and len(background.queued) == 3
        background.launch()
        assert background.take() == []  # nothing to hand over while the worker runs (it imports torch)
        ready = []
        with caplog.at_level(logging.WARNING):
            while background.busy:  # the worker, then the thread loading and running what landed
                assert background.wait(300)
                ready += background.take()
        assert [item.group for item in ready] == ["mlp", "mlp"]
        assert [key.startswith("unbroken-") for key in background.failed] == [True]
        assert "failed" in caplog.text and "graph_break" in caplog.text
        background.submit("unbroken", bad, (x,), {})  # a failed group is not tried again
        assert not background.queued

        fn = ready[0].fn  # loaded and run once by the thread
        assert deserialize(ready[1].data) is not None
        with torch.inference_mode():
            for rows in (3, 5):  # dynamic: another batch size, same artifact
                y = torch.randn(rows, 8)
                torch.testing.assert_close(fn(good, y, scale=2.0), good(y, scale=2.0))
        assert load_store(tmp_path / "model.cache", PLATFORM).keys("mlp")  # merged into the file too
    finally:
        background.close(stop=True)
    assert not background.spool.exists()


def test_closing_leaves_the_worker_to_finish_into_the_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline closed while its regions compile (a one-image CLI run) loses nothing: the worker finishes
    into the cache file, then removes the spool folder itself."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    block = Mlp().eval()
    block._class_forward = Mlp.forward
    background = _compiler(tmp_path)
    background.submit("mlp", block, (torch.randn(2, 8),), {})
    background.launch()
    worker = background._proc
    assert worker is not None
    assert background.close() == 1 and worker.poll() is None  # detached, still running
    assert worker.wait(300) == 0
    assert load_store(tmp_path / "model.cache", PLATFORM).keys("mlp")
    assert not background.spool.exists()
