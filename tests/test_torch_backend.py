"""The torch backend: options, compiled regions equal the eager path, and a new process starts from the
compile cache at full speed (ahead-of-time compiled regions loaded, not traced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import load_blob
from pipeline.engines.compile_cache import ArtifactStore, save_store
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
        ({"specialization": "lazy"}, "lazy is a TensorRT-RTX option"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"precision": "fp8"}, "fp8"),
        ({"cuda_graphs": True}, "cuda_graphs needs a CUDA device"),
        ({"compile": "yes"}, "must be true or false"),
        ({"attention": "magic"}, "attention must be one of"),
        ({"fp8_kernel": "int8"}, "fp8_kernel must be one of"),
        ({"autotune": "max"}, "must be true or false"),
        ({"channels_last": "nhwc"}, "must be true or false"),
        ({"compile_resnets": "later"}, "compile_resnets must be one of"),
        ({"inductor_options": {"no_such_setting": 1}}, "has no setting 'no_such_setting'"),
        ({"inductor_options": {"conv_1x1_as_mm": [1]}}, "must be a bool, number or string"),
        ({"inductor_options": "conv_1x1_as_mm"}, "must be a dict"),
    ],
)
def test_options_are_validated(tiny_sd: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, **options)


def test_cpu_defaults_are_eager_and_expose_the_model_cache(tiny_sd: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    assert pipe.backend.describe().startswith("torch (eager")
    assert not pipe.backend.channels_last  # the SD family's channels-last default is for CUDA only
    assert pipe.backend.model_cache.runtime_cache_path.is_relative_to(tmp_path)


def test_autotune_compiles_into_artifacts_of_their_own(tiny_sd: Path, tmp_path: Path) -> None:
    """autotune=True hands Inductor max-autotune, and its artifacts are keyed apart from the default ones
    (the tuned kernels live in the compile cache prewarm.py ships)."""
    from pipeline.engines.torch_options import AUTOTUNE_OPTIONS

    tuned = Pipeline.from_pretrained(
        tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, compile=True, autotune=True
    ).backend.compiler
    plain = Pipeline.from_pretrained(
        tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, compile=True
    ).backend.compiler
    assert AUTOTUNE_OPTIONS.items() <= tuned.options.items()
    assert not AUTOTUNE_OPTIONS.keys() & plain.options.keys()
    assert tuned.tag == plain.tag + "-autotune"


def test_inductor_options_reach_the_regions_keyed_apart(tiny_sd: Path, tmp_path: Path) -> None:
    kwargs = {"backend": "torch", "device": "cpu", "cache_dir": tmp_path, "compile": True}
    tuned = Pipeline.from_pretrained(tiny_sd, **kwargs, inductor_options={"conv_1x1_as_mm": True})
    plain = Pipeline.from_pretrained(tiny_sd, **kwargs)
    assert tuned.backend.compiler.options["conv_1x1_as_mm"] is True
    assert "conv_1x1_as_mm" not in plain.backend.compiler.options
    assert tuned.backend.tag.startswith(plain.backend.tag + "-ind") and tuned.backend.tag != plain.backend.tag


def test_regions_keep_the_module_tree(tiny_flux: Path, tmp_path: Path) -> None:
    """Compiling routes blocks through the compiler without renaming or replacing a parameter (LoRA,
    state dicts and diffusers' own code see the model as loaded)."""
    eager = Pipeline.from_pretrained(tiny_flux, backend="torch", device="cpu", cache_dir=tmp_path)
    compiled = Pipeline.from_pretrained(
        tiny_flux, backend="torch", device="cpu", cache_dir=tmp_path, compile=True
    )
    names = [n for n, _ in eager.backend.modules["transformer"].named_parameters()]
    assert [n for n, _ in compiled.backend.modules["transformer"].named_parameters()] == names
    assert len(compiled.backend.hooks) == 2  # one double and one single block in the tiny FLUX
    # a deep copy of the compiled model routes its own blocks (not the original's) through the compiler
    import copy

    twin = copy.deepcopy(compiled.backend.modules["transformer"])
    block = twin.transformer_blocks[0]
    assert block.forward.block is block and block.forward.compiler is compiled.backend.compiler


def test_a_damaged_compile_cache_is_survived(tiny_sd: Path, tmp_path: Path, caplog) -> None:
    pipe = Pipeline.from_pretrained(tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path)
    cache = pipe.model_cache.runtime_cache_path
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not a cache" * 100)
    with caplog.at_level("WARNING"):
        compiled = Pipeline.from_pretrained(
            tiny_sd, backend="torch", device="cpu", cache_dir=tmp_path, compile=True
        )
    assert any("ignoring cache" in r.getMessage() for r in caplog.records)
    assert compiled.backend.compiler is not None and not compiled.backend.compiler.store.entries


def test_compile_cache_saves_merge_what_others_saved(tmp_path: Path) -> None:
    """Two processes each compiled something: the second save keeps the first one's artifacts."""
    path, key = tmp_path / "runtime.cache", "torch-test-platform"
    first, second = ArtifactStore(), ArtifactStore()
    a = first.add("FluxTransformerBlock-x-dyn", b"compiled for batch 1")
    b = second.add("FluxTransformerBlock-x-dyn", b"compiled for batch 2")
    assert save_store(first, path, key, {}) and save_store(second, path, key, {})
    merged = ArtifactStore.from_bytes(load_blob(path, key))
    assert set(merged.entries) == {a, b}
    assert not save_store(second, path, key, {})  # nothing new: the file is left as it is


RUN = """
import json, sys, time, torch
from pipeline.pipeline import Pipeline
start = time.perf_counter()
pipe = Pipeline.from_pretrained(sys.argv[1], backend="torch", device="cpu", dtype=torch.float32,
                                cache_dir=sys.argv[2], compile=True)
load = time.perf_counter() - start
pipe.progress = False
times = []
for _ in range(3):
    start = time.perf_counter()
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), height=32, width=32,
                  num_inference_steps=2, output_type="np", max_sequence_length=32).images
    times.append(time.perf_counter() - start)
pipe.close()
stats = pipe.backend.stats.regions
json.dump({"load": load, "times": times, "loaded": stats.loaded, "compiled": len(stats.compiled),
           "jit": stats.jit_kinds, "images": images.tolist()}, open(sys.argv[3], "w"))
"""


def _run(model: Path, cache: Path, out: Path, inductor: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    subprocess.run([sys.executable, "-c", RUN, str(model), str(cache), str(out)], check=True, env=env)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_a_new_process_starts_at_full_speed_from_the_cache(tiny_flux: Path, tmp_path: Path) -> None:
    """Issue 11's CI target: a second process with an empty compiler cache folder (only the project's cache
    file carried over) pays at most 0.2x of the first process's compile cost, and draws the same image."""
    cold = _run(tiny_flux, tmp_path / "cache", tmp_path / "cold.json", tmp_path / "inductor-1")
    warm = _run(tiny_flux, tmp_path / "cache", tmp_path / "warm.json", tmp_path / "inductor-2")
    assert cold["compiled"] == 2 and not cold["jit"]  # both block kinds compiled ahead of time
    assert warm["compiled"] == 0 and warm["loaded"] == 2  # ... and loaded, not compiled, by the next process
    cold_extra = cold["times"][0] - min(cold["times"][1:])
    warm_extra = warm["times"][0] - min(warm["times"][1:])
    assert warm_extra <= 0.2 * cold_extra, (cold, warm)
    np.testing.assert_array_equal(np.asarray(warm["images"]), np.asarray(cold["images"]))

    eager = Pipeline.from_pretrained(tiny_flux, backend="torch", device="cpu", cache_dir=tmp_path)
    eager.progress = False
    reference = eager(
        "a cat", generator=torch.Generator().manual_seed(0), max_sequence_length=32, **KW
    ).images
    np.testing.assert_allclose(np.asarray(cold["images"]), reference, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_own_step_loop_with_cuda_graphs_equals_eager(tiny_sd: Path, tmp_path: Path) -> None:
    """Euler Ancestral runs its own step between denoiser calls replayed from a CUDA graph: same images as
    the eager loop, and the same again on the next call."""
    pipe = Pipeline.from_pretrained(
        tiny_sd,
        backend="torch",
        device="cuda",
        dtype=torch.float32,
        cache_dir=tmp_path,
        compile=False,
        cuda_graphs=True,
        scheduler="EulerAncestralDiscreteScheduler",
    )
    graphed, again = _images(pipe), _images(pipe)
    with pipe.backend.uncompiled():
        eager = _images(pipe)
    assert pipe.backend._graphed_calls["guided_denoiser"].graphs  # the denoiser call really was replayed
    assert np.abs(graphed - eager).max() < 1e-3
    assert np.array_equal(graphed, again)


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
    assert pipe.backend.hooks and pipe.backend.stats.regions.compiled
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)


def test_region_inputs_keep_one_layout_each() -> None:
    """Region inputs are canonicalized: row-major, or channels-last for a 4-D tensor already in it (a
    channels-last UNet's activations pass without a copy), size-1 dims included; the layout is in the key."""
    from pipeline.engines.region_keys import call_signature, canonical_inputs

    nhwc = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    kept = canonical_inputs(nhwc)
    assert kept.data_ptr() == nhwc.data_ptr() and kept.stride() == (128, 1, 32, 8)
    pooled = torch.randn(2, 8, 1, 1).to(memory_format=torch.channels_last)  # channels-last and row-major
    assert canonical_inputs(pooled).stride() == (8, 1, 1, 1)
    assert canonical_inputs(torch.randn(4, 6).t()).stride() == (4, 1)
    assert canonical_inputs(torch.randn(1, 5, 3).as_strided((1, 5, 3), (7, 3, 1))).stride() == (15, 3, 1)
    assert call_signature((nhwc,), {}) != call_signature((nhwc.contiguous(),), {})


def test_a_failed_compiler_warmup_never_raises(caplog) -> None:
    """The warm-up thread's failure (here: a CUDA device on a machine without one) is a log line; the first
    compile then pays the start-up, as it would have anyway."""
    from pipeline.engines.compile_warmup import CompilerWarmup

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with caplog.at_level("INFO"):
        assert CompilerWarmup(torch.device("cuda", 0)).join() is None
    assert any("compiler warm-up failed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_compiler_warmup_compiles_and_runs() -> None:
    from pipeline.engines.compile_warmup import CompilerWarmup

    warmup = CompilerWarmup(torch.device("cpu"), torch.float32)
    assert warmup.join() is not None and warmup.error is None


@pytest.mark.slow
def test_channels_last_unet_equals_eager(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """channels_last=True: the UNet's weights and activations in NHWC (cuDNN's native layout); resnet regions
    receive their inputs channels-last, uncopied, and are keyed apart from row-major ones; the image is the
    eager one. Each compile's phases (dynamo's timers) are kept for profiles."""
    from pipeline.engines import torch_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32, "compile_resnets": True}
    eager = _images(Pipeline.from_pretrained(tiny_sd, **kwargs, cache_dir=tmp_path / "eager"))
    seen: list[bool] = []
    canonical = torch_compile.canonical_inputs

    def spy(value):  # what region inputs look like once canonicalized
        out = canonical(value)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 4:
            seen.append(
                out[0].is_contiguous(memory_format=torch.channels_last) and not out[0].is_contiguous()
            )
        return out

    monkeypatch.setattr(torch_compile, "canonical_inputs", spy)
    pipe = Pipeline.from_pretrained(
        tiny_sd, **kwargs, cache_dir=tmp_path / "nhwc", compile=True, channels_last=True
    )
    unet = pipe.backend.modules["unet"]
    assert pipe.backend.channels_last and unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_images(pipe), eager, atol=1e-4)
    assert seen and all(seen)  # every 4-D region input arrived channels-last
    stats = pipe.backend.stats
    assert stats.warmup_s is None  # no warm-up thread on a CPU
    phases = next(iter(stats.regions.phases.values()))
    assert phases and any("compile" in name for name in phases) and max(phases.values()) > 0

    seen.clear()
    plain = Pipeline.from_pretrained(tiny_sd, **kwargs, cache_dir=tmp_path / "nchw", compile=True)
    _images(plain)
    assert seen and not any(seen)

    def resnet_groups(p: Pipeline) -> set[str]:
        return {g for g in p.backend.compiler.store.groups() if g.startswith("ResnetBlock2D")}

    assert resnet_groups(pipe) and resnet_groups(plain) and not resnet_groups(pipe) & resnet_groups(plain)


@pytest.mark.slow
def test_background_resnets_swap_in_and_persist(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile_resnets="background": the first call runs the resnets eagerly and compiles none of them; a worker
    process compiles them into the cache file; they are swapped in between calls (the image stays the eager
    one), and a new process loads them without compiling or submitting anything."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kwargs = {"backend": "torch", "device": "cpu", "dtype": torch.float32}
    eager = _images(Pipeline.from_pretrained(tiny_sd, **kwargs, cache_dir=tmp_path / "eager"))
    cache = tmp_path / "cache"
    with Pipeline.from_pretrained(
        tiny_sd, **kwargs, cache_dir=cache, compile=True, compile_resnets="background"
    ) as pipe:
        backend = pipe.backend
        np.testing.assert_allclose(_images(pipe), eager, atol=1e-4)
        assert backend.background_busy
        assert not any(key.startswith("ResnetBlock2D") for key in backend.stats.regions.compiled)
        assert backend.wait_background(600)
        assert backend.stats.regions.background > 0
        np.testing.assert_allclose(_images(pipe), eager, atol=1e-4)
        assert not backend.background_busy  # the same shapes: nothing new to compile
        landed = backend.stats.regions.background

    again = Pipeline.from_pretrained(
        tiny_sd, **kwargs, cache_dir=cache, compile=True, compile_resnets="background"
    )
    with again:
        np.testing.assert_allclose(_images(again), eager, atol=1e-4)
        stats = again.backend.stats.regions
        assert stats.loaded >= landed and not stats.compiled and not again.backend.background_busy


def test_families_set_inductor_defaults_on_cuda_only_and_the_user_wins() -> None:
    """SD 1.x/2.x lowers 1x1 convolutions to GEMMs on CUDA by measurement (fewer cuDNN plans at a new size);
    SDXL, FLUX and every CPU run keep Inductor's defaults, and the user's inductor_options override by name."""
    from pipeline.engines.torch_options import inductor_options_for
    from pipeline.families.flux import FluxFamily
    from pipeline.families.sd import StableDiffusionFamily
    from pipeline.families.sdxl import StableDiffusionXLFamily

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    sd = StableDiffusionFamily.inductor_options_on_cuda
    assert inductor_options_for(sd, cuda, {}) == {"conv_1x1_as_mm": True}
    assert inductor_options_for(sd, cpu, {}) == {}
    assert inductor_options_for(sd, cuda, {"conv_1x1_as_mm": False}) == {"conv_1x1_as_mm": False}
    for family in (StableDiffusionXLFamily, FluxFamily):
        assert inductor_options_for(family.inductor_options_on_cuda, cuda, {}) == {}
    assert inductor_options_for({}, cuda, {"max_fusion_size": 8}) == {"max_fusion_size": 8}
