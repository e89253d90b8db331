"""TensorRT-RTX engine builds and runtime-cache files, with the real library, on a machine without a GPU.

Engines build without a GPU because the builder config names compute capabilities. Running them, and the
`IRuntimeCache` object itself, need a supported GPU (the cache is created from an engine's runtime config,
and engines deserialize only on a GPU): those are in test_rtx_runtime.py. Here the runtime cache's file
handling is driven through `RuntimeCache` with a stand-in for the two TensorRT-RTX objects it touches.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import onnx
import pytest
from conftest import tiny_range

from pipeline.cache import file_lock, save_blob
from pipeline.engines.profile_guard import ProfileGuard
from pipeline.engines.rtx import invalidity_reasons, trt
from pipeline.engines.rtx_cache import RuntimeCache
from pipeline.errors import InvalidInputError, OutOfProfileError
from pipeline.export.engine_args import build_engines_from_args, engine_dir_name
from pipeline.export.engine_meta import DEFAULT_TARGETS, onnx_sha256, parse_targets
from pipeline.export.engines import EngineBuildError, build_engine, build_engines
from pipeline.families import Family, ShapeRange


@pytest.fixture(scope="module")
def built(tiny_engines: dict[str, dict]) -> dict[str, dict]:
    return tiny_engines


@pytest.mark.parametrize("family_name", ["flux", "sd", "sdxl"])
def test_every_stage_builds_for_portable_targets(built: dict[str, dict], family_name: str) -> None:
    family, engines = built[family_name]["family"], built[family_name]["engines"]
    assert set(engines) == set(family.stages)
    for stage, path in engines.items():
        assert path.stat().st_size > 10_000, stage
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["targets"] == list(DEFAULT_TARGETS) == ["sm86", "sm89", "sm120"]
        assert meta["tensorrt_rtx"] == trt.__version__
        assert meta["engine_bytes"] == path.stat().st_size
        # the memory plan's inputs: precision, streaming, and what the builder reported
        assert meta["precision"] == "fp32" and meta["weight_streaming"] is True
        assert meta["denoiser"] is (stage == family.denoiser)
        assert 0 < meta["weight_bytes"] <= meta["engine_bytes"]
        assert meta["activation_bytes"] > 0 or stage == "text_encoder"
        # the profile is the family's, for every input the ONNX graph kept
        profile = family.profile(stage, tiny_range(family))
        assert meta["profile"] == {k: [list(s) for s in v] for k, v in sorted(profile.items())}


def test_matching_metadata_skips_the_build(built: dict[str, dict], caplog: pytest.LogCaptureFixture) -> None:
    sd = built["sd"]
    mtimes = {s: p.stat().st_mtime_ns for s, p in sd["engines"].items()}
    with caplog.at_level(logging.INFO, logger="pipeline.export.engines"):
        again = build_engines(
            sd["family"], sd["root"] / "onnx", sd["root"] / "engines", shape_range=tiny_range(sd["family"])
        )
    assert {s: p.stat().st_mtime_ns for s, p in again.items()} == mtimes
    assert sum("up to date" in r.getMessage() for r in caplog.records) == len(mtimes)
    assert not any("building" in r.getMessage() for r in caplog.records)


@pytest.fixture
def one_stage(built: dict[str, dict], tmp_path: Path) -> tuple[Family, Path, Path]:
    """A private copy of the tiny SD text encoder's ONNX and engine, to change and rebuild."""
    sd = built["sd"]
    shutil.copy(sd["root"] / "onnx" / "text_encoder.onnx", tmp_path / "text_encoder.onnx")
    shutil.copy(sd["root"] / "onnx" / "manifest.json", tmp_path / "manifest.json")  # says its precision
    for suffix in (".engine", ".json"):
        shutil.copy(sd["engines"]["text_encoder"].with_suffix(suffix), tmp_path / f"text_encoder{suffix}")
    return sd["family"], tmp_path / "text_encoder.onnx", tmp_path / "text_encoder.engine"


def _rebuild(family: Family, onnx_path: Path, engine: Path, **kwargs) -> Path:
    stage = family.stages["text_encoder"]
    return build_engine(
        onnx_path, stage, family.profile("text_encoder", tiny_range(family)), engine, **kwargs
    )


def _build_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("building")]


def test_other_targets_rebuild_saying_why(one_stage, caplog: pytest.LogCaptureFixture) -> None:
    family, onnx_path, engine = one_stage
    before = engine.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="pipeline.export.engines"):
        _rebuild(family, onnx_path, engine, targets=["sm80", "sm86"])
    assert engine.stat().st_mtime_ns != before
    (reason,) = _build_reasons(caplog)
    assert "targets changed (['sm86', 'sm89', 'sm120'] -> ['sm80', 'sm86'])" in reason
    assert json.loads(engine.with_suffix(".json").read_text())["targets"] == ["sm80", "sm86"]


def test_changed_onnx_rebuilds_saying_why(one_stage, caplog: pytest.LogCaptureFixture) -> None:
    family, onnx_path, engine = one_stage
    model = onnx.load(str(onnx_path))
    model.doc_string = "re-exported"
    onnx.save(model, str(onnx_path))
    with caplog.at_level(logging.INFO, logger="pipeline.export.engines"):
        _rebuild(family, onnx_path, engine)
    (reason,) = _build_reasons(caplog)
    assert "ONNX changed" in reason


def test_other_profile_or_flags_rebuild(one_stage, caplog: pytest.LogCaptureFixture) -> None:
    family, onnx_path, engine = one_stage
    stage = family.stages["text_encoder"]
    wide = ShapeRange(
        tiny_range(family).min_size, tiny_range(family).opt_size, tiny_range(family).max_size, 1, 2, 4
    )
    with caplog.at_level(logging.INFO, logger="pipeline.export.engines"):
        build_engine(onnx_path, stage, family.profile("text_encoder", wide), engine)
        build_engine(onnx_path, stage, family.profile("text_encoder", wide), engine, weight_streaming=False)
        build_engine(onnx_path, stage, family.profile("text_encoder", wide), engine, weight_streaming=False)
    reasons = _build_reasons(caplog)
    assert len(reasons) == 2
    assert reasons[0].endswith(": profile changed")
    assert reasons[1].endswith(": weight_streaming changed (True -> False)")


def test_damaged_metadata_or_missing_engine_rebuilds(one_stage, caplog: pytest.LogCaptureFixture) -> None:
    family, onnx_path, engine = one_stage
    engine.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="pipeline.export.engines"):
        _rebuild(family, onnx_path, engine)
        engine.unlink()
        _rebuild(family, onnx_path, engine)
    reasons = _build_reasons(caplog)
    assert "no readable metadata" in reasons[0]
    assert "no engine yet" in reasons[1]
    assert engine.is_file()


def test_unparsable_onnx_is_one_clear_error(built: dict[str, dict], tmp_path: Path) -> None:
    family = built["sd"]["family"]
    bad = tmp_path / "text_encoder.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(EngineBuildError, match=r"cannot parse .*re-export"):
        _rebuild(family, bad, tmp_path / "text_encoder.engine")
    assert not (tmp_path / "text_encoder.engine").exists()
    with pytest.raises(EngineBuildError, match="no ONNX"):
        _rebuild(family, tmp_path / "missing.onnx", tmp_path / "x.engine")


def test_targets_are_checked() -> None:
    assert parse_targets("SM86, sm89,sm120") == ("sm86", "sm89", "sm120")
    assert parse_targets(["current"]) == ("current",)
    with pytest.raises(InvalidInputError, match="sm90"):
        parse_targets("sm86,sm90")
    with pytest.raises(InvalidInputError, match="current"):
        parse_targets("current,sm86")
    with pytest.raises(InvalidInputError, match=r"its runtime refuses compute capability 7\.5.*drop it"):
        parse_targets("sm75,sm86")


def test_onnx_hash_is_remembered_until_the_file_changes(one_stage, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.cache.files as files

    _, onnx_path, _ = one_stage
    reads: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: reads.append(Path(p)) or real(p))
    first = onnx_sha256(onnx_path)
    assert onnx_sha256(onnx_path) == first and len(reads) == 1  # the second start reads nothing
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # another size, another mtime
    assert onnx_sha256(onnx_path) != first and len(reads) == 2


def test_engine_validity_diagnostics_say_whether_a_rebuild_helps() -> None:
    flags = trt.EngineInvalidityDiagnostics
    rebuild, blocking = invalidity_reasons(int(flags.VERSION_MISMATCH) | int(flags.UNSUPPORTED_CC))
    assert rebuild == ["built by another TensorRT-RTX version", "not built for this GPU's compute capability"]
    assert blocking == []
    rebuild, blocking = invalidity_reasons(int(flags.INSUFFICIENT_GPU_MEMORY) | int(flags.OLD_CUDA_DRIVER))
    assert rebuild == [] and any("update the driver" in b for b in blocking)
    assert any("--low-vram" in b for b in blocking)
    assert invalidity_reasons(int(flags.CUDA_ERROR))[1][0].startswith("CUDA reported an error")


def test_cli_arguments_build_into_a_versioned_folder(built: dict[str, dict], tmp_path: Path) -> None:
    sd = built["sd"]
    shutil.copy(sd["root"] / "onnx" / "text_encoder.onnx", tmp_path / "text_encoder.onnx")
    g = sd["family"].granularity
    args = argparse.Namespace(
        targets="sm89", min_size=f"{2 * g}x{2 * g}", opt_size=f"{4 * g}x{4 * g}", max_size=f"{8 * g}x{8 * g}",
        max_batch=2, stages="text_encoder",
    )  # fmt: skip
    paths = build_engines_from_args(args, sd["family"], tmp_path)
    assert paths["text_encoder"] == tmp_path / "engines" / engine_dir_name(["sm89"]) / "text_encoder.engine"
    assert engine_dir_name(["sm89"]) == f"rtx-{trt.__version__}-sm89"
    assert json.loads(paths["text_encoder"].with_suffix(".json").read_text())["targets"] == ["sm89"]
    args.max_size = "100x7"
    with pytest.raises(InvalidInputError, match="multiple of"):
        build_engines_from_args(args, sd["family"], tmp_path)


# ---- out-of-profile requests: plain words, before TensorRT-RTX sees them ------------------------------------


def test_out_of_profile_request_names_the_range(built: dict[str, dict]) -> None:
    sd, flux = built["sd"]["family"], built["flux"]["family"]
    r = ShapeRange((512, 512), (1024, 1024), (1024, 1024), 1, 1, 1)
    unet_spec = sd.stages["unet"]
    unet = ProfileGuard(unet_spec, sd.profile("unet", r), sd)
    unet.check("sample", unet_spec.shapes(sd.dims(1024, 768, 1))["sample"])  # inside
    tall = unet_spec.shapes(sd.dims(1536, 1024, 1))["sample"]
    with pytest.raises(
        OutOfProfileError,
        match=r"height 1536 is outside the engine's 512\.\.1024 range.*--max-size 1536x1536",
    ):
        unet.check("sample", tall)
    with pytest.raises(
        OutOfProfileError, match=r"batch .* 4 is outside the engine's 1\.\.2 range.*--max-batch"
    ):
        unet.check("sample", unet_spec.shapes(sd.dims(1024, 1024, 2))["sample"])
    spec = flux.stages["transformer"]
    transformer = ProfileGuard(spec, flux.profile("transformer", r), flux)
    big = spec.shapes(flux.dims(1536, 1536, 1, text_tokens=600))
    with pytest.raises(OutOfProfileError, match=r"1536x1536 pixels .* 512x512\.\.1024x1024 range"):
        transformer.check("hidden_states", big["hidden_states"])
    with pytest.raises(OutOfProfileError, match=r"prompt length 600 tokens .* 256\.\.512"):
        transformer.check("txt_ids", big["txt_ids"])


# ---- runtime cache file: lock, atomic replace, bad files ---------------------------------------------------


class FakeTrtCache:
    """Stands in for IRuntimeCache (which needs a GPU): deserialize/serialize/reset."""

    def __init__(self, accepts: bool = True) -> None:
        self.content = b""
        self.accepts = accepts

    def deserialize(self, blob: bytes) -> bool:
        if self.accepts:
            self.content = bytes(blob)
        return self.accepts

    def serialize(self) -> bytes:
        return self.content

    def reset(self) -> bool:
        self.content = b""
        return True


class FakeRuntimeConfig:
    """Stands in for IRuntimeConfig: creates the cache and records which cache it was given."""

    def __init__(self, accepts: bool = True) -> None:
        self.accepts = accepts
        self.created: list[FakeTrtCache] = []
        self.attached: FakeTrtCache | None = None

    def create_runtime_cache(self) -> FakeTrtCache:
        self.created.append(FakeTrtCache(self.accepts))
        return self.created[-1]

    def set_runtime_cache(self, cache: FakeTrtCache) -> bool:
        self.attached = cache
        return True


def test_runtime_cache_is_shared_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "runtime" / "gpu-a.cache"
    with RuntimeCache(path, key="gpu-a") as cache:
        configs = [FakeRuntimeConfig() for _ in range(3)]  # three stages
        for c in configs:
            cache.attach(c)
        assert sum(len(c.created) for c in configs) == 1  # ONE cache ...
        assert {id(c.attached) for c in configs} == {id(configs[0].created[0])}  # ... for every stage
        configs[0].created[0].content = b"compiled kernels"
    assert path.is_file()  # saved on context exit
    again = RuntimeCache(path, key="gpu-a")
    assert again.loaded_bytes == len(b"compiled kernels")
    config = FakeRuntimeConfig()
    again.attach(config)
    assert config.created[0].content == b"compiled kernels"


def test_close_saves_once_and_nothing_before_use(tmp_path: Path) -> None:
    path = tmp_path / "a.cache"
    cache = RuntimeCache(path, key="gpu-a")
    assert cache.save() is False and not path.exists()  # no engine used it yet
    cache.attach(FakeRuntimeConfig())
    cache.close()
    first = path.stat().st_mtime_ns
    cache.close()
    assert path.stat().st_mtime_ns == first


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_file_is_a_warning_and_a_fresh_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "a.cache"
    save_blob(path, b"x" * 1000, "gpu-a")
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[:-100], "garbage": b"\x00garbage" * 10, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        cache = RuntimeCache(path, key="gpu-a")
    assert cache.loaded_bytes == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    config = FakeRuntimeConfig()
    cache.attach(config)
    config.created[0].content = b"new kernels"
    cache.save()  # the bad file is replaced
    assert RuntimeCache(path, key="gpu-a").loaded_bytes == len(b"new kernels")


def test_cache_from_another_platform_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a.cache"
    save_blob(path, b"kernels of another gpu", "gpu-b")
    with caplog.at_level(logging.WARNING):
        cache = RuntimeCache(path, key="gpu-a")
    assert cache.loaded_bytes == 0
    assert "gpu-b" in caplog.text
    cache.attach(FakeRuntimeConfig())
    cache.save()
    assert RuntimeCache(path, key="gpu-a").loaded_bytes == 0  # now ours (empty), no warning
    assert caplog.text.count("gpu-b") == 1


def test_cache_tensorrt_rejects_is_a_warning_and_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.cache"
    save_blob(path, b"blob from an older driver", "gpu-a")
    cache = RuntimeCache(path, key="gpu-a")
    config = FakeRuntimeConfig(accepts=False)  # IRuntimeCache.deserialize returns False on a mismatch
    with caplog.at_level(logging.WARNING):
        cache.attach(config)
    assert "does not fit this GPU" in caplog.text
    assert config.attached is config.created[0] and config.created[0].content == b""


def test_save_waits_for_the_lock_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a.cache"
    save_blob(path, b"old", "gpu-a")
    cache = RuntimeCache(path, key="gpu-a")
    config = FakeRuntimeConfig()
    cache.attach(config)
    config.created[0].content = b"new kernels"
    with file_lock(path):  # another process is writing
        saver = threading.Thread(target=cache.save)
        saver.start()
        time.sleep(0.5)
        assert saver.is_alive()
        assert path.read_bytes().endswith(b"old")
    saver.join(10)
    assert path.read_bytes().endswith(b"new kernels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cache"]  # no temp file, no lock file left


@pytest.mark.parametrize(
    ("made_with", "here", "usable"),
    [("560.35.03", "560.35.03", True), ("560.35.03", "565.57.01", True), ("565.57.01", "560.35.03", False)],
    ids=["same-driver", "newer-driver-here", "older-driver-here"],
)
def test_runtime_cache_needs_a_driver_at_least_as_new_as_the_one_that_made_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, made_with: str, here: str, usable: bool
) -> None:
    """TensorRT-RTX's rule: the same GPU and TensorRT-RTX version (the platform key), and a driver >= the one
    that made the cache, recorded in the file's header: the driver is not part of the key."""
    path = tmp_path / "a.cache"
    save_blob(path, b"kernels", "gpu-a", meta={"driver_version": made_with})
    with caplog.at_level(logging.WARNING):
        cache = RuntimeCache(path, key="gpu-a", driver_version=here)
    assert cache.loaded_bytes == (len(b"kernels") if usable else 0)
    assert ("update the driver" in caplog.text) == (not usable)


def test_runtime_cache_records_the_driver_that_made_it(tmp_path: Path) -> None:
    from pipeline.cache import read_blob_header

    path = tmp_path / "a.cache"
    cache = RuntimeCache(path, key="gpu-a", driver_version="560.35.03")
    cache.attach(FakeRuntimeConfig())
    assert cache.save()
    assert read_blob_header(path).meta["driver_version"] == "560.35.03"
