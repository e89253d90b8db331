"""Attention chosen per thread at run time (engines/attention.py) and the thread that recaptures graphs with
another kernel (engines/graph_upgrade.py). The CUDA side (flash vs cuDNN graphs) is measured on the GPU by
scripts/bench.py; here: the op's results and layout, the redirect's scope, compiled SD regions that carry the
op and still equal the eager pipeline, and the upgrade thread's bookkeeping with real threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.engines import attention
from pipeline.engines.graph_upgrade import GraphUpgrader
from pipeline.errors import InvalidInputError
from pipeline.pipeline import Pipeline


def _heads(b: int, s: int, h: int, d: int) -> torch.Tensor:
    """(B, H, S, D) over (B, S, H, D) memory, as diffusers' processors split heads."""
    return torch.randn(b, s, h, d).transpose(1, 2)


@pytest.mark.parametrize("split", [True, False])
def test_the_op_equals_torch_attention_in_the_layout_it_promises(split: bool) -> None:
    q = _heads(2, 33, 4, 16) if split else torch.randn(2, 4, 33, 16)
    k, v = _heads(2, 7, 4, 16), torch.randn(2, 4, 7, 16)
    out = attention.attention(q, k, v, 0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert out.stride() == torch.empty(2, 33, 4, 16).transpose(1, 2).stride()


def test_the_redirect_is_scoped_and_leaves_masked_calls_to_torch() -> None:
    q, k, v = _heads(1, 5, 2, 8), _heads(1, 5, 2, 8), _heads(1, 5, 2, 8)
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="inside"), attention.redirect_sdpa():
        with attention.redirect_sdpa():  # nested: one patch, restored by the outermost
            assert F.scaled_dot_product_attention is not original
        assert F.scaled_dot_product_attention is not original
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(causal, original(q, k, v, is_causal=True))
        raise RuntimeError("inside")
    assert F.scaled_dot_product_attention is original
    with attention.redirect_sdpa(enabled=False):
        assert F.scaled_dot_product_attention is original


def test_a_compiled_graph_carries_the_op_where_attention_was() -> None:
    from torch._dynamo.testing import EagerAndRecordGraphs

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    q, k, v = _heads(1, 9, 2, 8), _heads(1, 9, 2, 8), _heads(1, 9, 2, 8)
    graphs = EagerAndRecordGraphs()
    torch._dynamo.reset()
    with attention.redirect_sdpa():
        out = torch.compile(block, backend=graphs, fullgraph=True)(q, k, v)
    assert attention.OP_NAME.replace("::", ".") in graphs.graphs[0].code
    torch.testing.assert_close(out, block(q, k, v))


def test_the_backend_choice_is_per_thread() -> None:
    seen: list[str | None] = []
    with attention.use_backend("flash"):
        worker = threading.Thread(target=lambda: seen.append(attention.current_backend()))
        worker.start()
        worker.join()
        assert attention.current_backend() == "flash"
    assert seen == [None] and attention.current_backend() is None


def test_the_upgrade_thread_runs_jobs_under_its_backend_and_drops_stale_ones(caplog) -> None:
    upgrader = GraphUpgrader(backend="flash")
    release = threading.Event()

    def job(wanted) -> tuple:
        release.wait(10)
        return threading.get_ident(), attention.current_backend(), torch.is_inference_mode_enabled(), wanted()

    try:
        upgrader.submit("a", job)
        assert upgrader.busy and upgrader.take() == {}
        release.set()
        assert upgrader.wait(10)
        ready = upgrader.take()
        ident, backend, inference, wanted = ready["a"]
        assert ident != threading.get_ident() and backend == "flash" and inference and wanted
        assert upgrader.take() == {} and upgrader.done == 1

        release.clear()
        upgrader.submit("b", job)  # running when the generation changes: its result is dropped
        stale: list[str] = []
        upgrader.submit("c", lambda wanted: stale.append("ran"))
        upgrader.invalidate()
        release.set()
        assert upgrader.wait(10) and upgrader.take() == {} and stale == []

        def broken(wanted) -> None:
            raise ValueError("no graph today")

        with caplog.at_level("WARNING"):
            upgrader.submit("d", broken)
            upgrader.wait(10)
        assert upgrader.failed == 1
        assert any("no graph today" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
        upgrader.close()


def test_fresh_shape_attention_is_validated(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="fresh_shape_attention must be one of"):
        Pipeline.from_pretrained(
            tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, fresh_shape_attention="math"
        )


def test_compiled_sd_regions_run_the_op_and_equal_eager(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD opts in (Family.fresh_shape_attention): its compiled regions carry the op (keyed apart: the tag),
    its image equals the eager pipeline's; with the option off, attention stays torch's inside regions."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32, "cache_dir": tmp_path}
    request = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}

    def run(pipe: Pipeline) -> tuple[np.ndarray, set[str]]:
        pipe.progress = False
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            images = pipe("a cat", generator=torch.Generator().manual_seed(0), **request).images
        return images, {e.key for e in prof.key_averages()}

    eager, _ = run(Pipeline.from_pretrained(tiny_sd, **kwargs))
    compiled = Pipeline.from_pretrained(tiny_sd, **kwargs, compile=True)
    assert compiled.backend.tag.endswith("-rtattn")
    images, ops = run(compiled)
    assert attention.OP_NAME in ops and compiled.backend.stats.regions.compiled
    np.testing.assert_allclose(images, eager, atol=1e-4)
    off = Pipeline.from_pretrained(tiny_sd, **kwargs, compile=True, fresh_shape_attention="off")
    assert not off.backend.tag.endswith("-rtattn")
    images, ops = run(off)
    assert attention.OP_NAME not in ops
    np.testing.assert_allclose(images, eager, atol=1e-4)
