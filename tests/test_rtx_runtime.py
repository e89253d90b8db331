"""TensorRT-RTX engines at run time: they need a GPU TensorRT-RTX runs on (compute capability 8.0, 8.6, 8.9
or 12.x). Everywhere else every test here is skipped with `rtx_supported()`'s reason (H100/H200 are 9.0), so
they have not run yet: they are written against the tensorrt_rtx 1.7 bindings and NVIDIA's demo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline.engines.memory import SharedDeviceMemory
from pipeline.engines.rtx import EngineUnusableError, StaleEngineError, rtx_supported
from pipeline.engines.rtx_cache import RuntimeCache
from pipeline.engines.rtx_engine import RtxEngine
from pipeline.errors import OutOfProfileError
from pipeline.families import Family

SUPPORTED, WHY = rtx_supported()
pytestmark = [pytest.mark.rtx, pytest.mark.skipif(not SUPPORTED, reason=WHY)]


@pytest.fixture(autouse=True)
def side_stream() -> object:
    """Engines run on the caller's stream; like the pipeline, the tests use a non-default one."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        yield stream
    stream.synchronize()


@pytest.fixture(scope="module")
def engines(tiny_engines: dict[str, dict]) -> dict[str, dict]:
    """The session's tiny engines, with each stage's torch module on the GPU to compare against."""
    out = {}
    for name, built in tiny_engines.items():
        family, source = built["family"], built["source"]
        modules = {
            s.name: source.load_component(s.component, torch.float32, "cuda") for s in family.stages.values()
        }
        out[name] = {"family": family, "paths": built["engines"], "modules": modules, "root": built["root"]}
    return out


def _inputs(family: Family, stage: str, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    dims = family.dims(size, size, 1)
    dims.setdefault("text_tokens", 256)
    gen = torch.Generator().manual_seed(seed)
    return family.stages[stage].example_inputs(dims, torch.float32, "cuda", generator=gen, int_high=50)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("family_name", "stage"),
    [("flux", s) for s in ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")]
    + [("sd", s) for s in ("text_encoder", "unet", "vae_decoder")]
    + [("sdxl", s) for s in ("text_encoder", "text_encoder_2", "unet", "vae_decoder")],
)
def test_engine_matches_torch(engines: dict[str, dict], family_name: str, stage: str, tmp_path: Path) -> None:
    e = engines[family_name]
    family = e["family"]
    with RuntimeCache(tmp_path / "rt.cache") as cache:
        engine = RtxEngine(e["paths"][stage], family.stages[stage], cache=cache, family=family)
        x = _inputs(family, stage, 4 * family.granularity)
        got = engine(**x)
        with torch.inference_mode():
            want = family.stages[stage].forward(e["modules"][stage], x)
        torch.cuda.current_stream().synchronize()  # only the test waits; the engine never does
        assert set(got) == set(want)
        for name in want:
            _close(got[name], want[name])


def test_lazy_specialization_serves_new_shapes(engines: dict[str, dict], tmp_path: Path) -> None:
    e = engines["sd"]
    family = e["family"]
    with RuntimeCache(tmp_path / "rt.cache") as cache:
        engine = RtxEngine(
            e["paths"]["vae_decoder"], family.stages["vae_decoder"], cache=cache, specialization="lazy"
        )
        for size in (2, 4, 8, 4, 2):  # new shapes first run on fallback kernels, then specialized ones
            x = _inputs(family, "vae_decoder", size * family.granularity)
            for _ in range(3):
                got = engine(**x)["sample"].clone()
            with torch.inference_mode():
                want = family.stages["vae_decoder"].forward(e["modules"]["vae_decoder"], x)["sample"]
            _close(got, want)


def test_cuda_graphs_over_static_buffers(engines: dict[str, dict], tmp_path: Path) -> None:
    """Every step gives the engine NEW tensors (as SD's loop does: torch.cat makes the guidance batch each
    step); they are copied into the shape's static buffers the captured graph reads, and the outputs come
    from static buffers, so replays see the new values. Two shapes keep two sets of buffers."""
    e = engines["sd"]
    family = e["family"]
    with RuntimeCache(tmp_path / "rt.cache") as cache:
        engine = RtxEngine(e["paths"]["unet"], family.stages["unet"], cache=cache, cuda_graphs=True)
        outputs: dict[int, int] = {}
        for step in range(8):
            size = (4 if step % 4 < 3 else 6) * family.granularity  # 3 steps of one shape, 1 of another
            x = _inputs(family, "unet", size, seed=step)  # fresh tensors at fresh addresses
            got = engine(**x)["noise_pred"]
            outputs.setdefault(size, got.data_ptr())
            assert got.data_ptr() == outputs[size]  # a static output buffer per shape
            with torch.inference_mode():
                want = family.stages["unet"].forward(e["modules"]["unet"], x)["noise_pred"]
            _close(got, want)
        assert len(outputs) == 2 and len(engine._static) == 2


def test_stages_share_one_activation_buffer(engines: dict[str, dict], tmp_path: Path) -> None:
    e = engines["sd"]
    family = e["family"]
    memory = SharedDeviceMemory(torch.device("cuda", torch.cuda.current_device()))
    with RuntimeCache(tmp_path / "rt.cache") as cache:
        loaded = {
            stage: RtxEngine(e["paths"][stage], family.stages[stage], cache=cache, memory=memory)
            for stage in family.stages
        }
        assert memory.size == max(engine.device_memory_bytes for engine in loaded.values()) > 0
        for stage, engine in loaded.items():  # one after another, as the pipeline runs them
            x = _inputs(family, stage, 4 * family.granularity)
            got = engine(**x)
            with torch.inference_mode():
                want = family.stages[stage].forward(e["modules"][stage], x)
            for name in want:
                _close(got[name], want[name])


def test_fp8_engine_with_a_streaming_budget(tiny_fp8: dict, engines: dict[str, dict]) -> None:
    """The fp8 denoiser with none of its streamable weights on the GPU (budget 0) gives the numbers it gives
    with all of them, within fp8 of the torch module."""
    fp8 = tiny_fp8["sd"]
    family = fp8["family"]
    x = _inputs(family, "unet", 4 * family.granularity)
    full = RtxEngine(fp8["engine"], family.stages["unet"], family=family)
    assert full.weight_budget_bytes is None and full.engine.streamable_weights_size > 0
    want = full(**x)["noise_pred"].clone()
    streamed = RtxEngine(fp8["engine"], family.stages["unet"], family=family, weight_budget_bytes=0)
    assert streamed.weight_budget_bytes == 0 == streamed.engine.weight_streaming_budget_v2
    got = streamed(**x)["noise_pred"]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        ref = family.stages["unet"].forward(engines["sd"]["modules"]["unet"], x)["noise_pred"]
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_deferred_weights_come_and_go(engines: dict[str, dict]) -> None:
    """Low VRAM: a deferred engine's weights are on the GPU only between load and unload."""
    e = engines["sd"]
    family = e["family"]
    engine = RtxEngine(e["paths"]["text_encoder"], family.stages["text_encoder"], deferred=True)
    assert not engine.weights_loaded
    x = _inputs(family, "text_encoder", 4 * family.granularity)
    first = engine(**x)["last_hidden_state"].clone()  # loads its weights first
    assert engine.weights_loaded
    engine.unload_weights()
    assert not engine.weights_loaded
    torch.testing.assert_close(engine(**x)["last_hidden_state"], first)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_engine_runs_on_the_device_it_is_given(engines: dict[str, dict]) -> None:
    e = engines["sd"]
    family = e["family"]
    device = torch.device("cuda", 1)
    engine = RtxEngine(e["paths"]["vae_decoder"], family.stages["vae_decoder"], device=device)
    x = {k: v.to(device) for k, v in _inputs(family, "vae_decoder", 4 * family.granularity).items()}
    with torch.cuda.stream(torch.cuda.Stream(device)):
        out = engine(**x)["sample"]
    assert out.device == device and torch.cuda.current_device() == 0


def test_runtime_cache_saves_and_loads(
    engines: dict[str, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    e = engines["sd"]
    family = e["family"]
    path = tmp_path / "rt.cache"
    with RuntimeCache(path) as cache:
        for stage in family.stages:  # one cache for every stage
            engine = RtxEngine(e["paths"][stage], family.stages[stage], cache=cache, specialization="eager")
            engine(**_inputs(family, stage, 4 * family.granularity))
        torch.cuda.synchronize()
    assert path.stat().st_size > 0
    with caplog.at_level(logging.WARNING):
        again = RuntimeCache(path)
        RtxEngine(e["paths"]["unet"], family.stages["unet"], cache=again)
    assert again.loaded_bytes > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_out_of_profile_is_a_plain_error(engines: dict[str, dict]) -> None:
    e = engines["sd"]
    family = e["family"]
    engine = RtxEngine(e["paths"]["vae_decoder"], family.stages["vae_decoder"], family=family)
    with pytest.raises(
        OutOfProfileError, match=r"height \d+ is outside the engine's .* range; rebuild with --max-size"
    ):
        engine(**_inputs(family, "vae_decoder", 16 * family.granularity))


def test_damaged_engine_is_stale(engines: dict[str, dict], tmp_path: Path) -> None:
    e = engines["sd"]
    bad = tmp_path / "unet.engine"
    data = bytearray(e["paths"]["unet"].read_bytes())
    data[:64] = bytes(64)
    bad.write_bytes(bytes(data))
    with pytest.raises((StaleEngineError, EngineUnusableError), match="cannot run here"):
        RtxEngine(bad, e["family"].stages["unet"])
