"""The cache folder survives what users' machines do: concurrent processes, kills, damaged and foreign files."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import resource
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.cache import (
    SHIPPED_FILE,
    ModelCache,
    PlatformInfo,
    ShippedCache,
    cache_info,
    clear_cache,
    encode_blob,
    load_blob,
    model_key,
    platform_info,
    platform_key,
    resolve_runtime_cache,
    save_blob,
    sha256_file,
    update_manifest,
)
from pipeline.loading import ModelSource

PLATFORM = "torch-cpu-x86_64-avx2-py3.11-torch2.13.0_cpu"
OTHER_PLATFORM = "rtx-nvidia_geforce_rtx_4090-sm89-cuda12.9-trtrtx1.7.1"
FORK = mp.get_context("fork")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uses fork and POSIX signals")


def _model_cache(root: Path, platform: str = PLATFORM) -> ModelCache:
    return ModelCache(root, "org--tiny-model-0123456789abcdef", platform)


def _payload(writer: int, iteration: int, size: int = 1 << 20) -> bytes:
    """A payload that says who wrote it, so a reader can tell a whole one from a mix of two."""
    tag = f"writer {writer} iteration {iteration};".encode()
    return (tag * (size // len(tag) + 1))[:size]


def _is_whole_payload(data: bytes) -> bool:
    match = re.match(rb"writer (\d+) iteration (\d+);", data)
    return bool(match) and data == _payload(int(match.group(1)), int(match.group(2)), len(data))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- basics -------------------------------------------------------------------------------------------


def test_save_then_load_returns_the_payload(tmp_path: Path) -> None:
    path = _model_cache(tmp_path).runtime_cache_path
    assert load_blob(path, PLATFORM) is None  # cold: a quiet miss
    assert save_blob(path, b"compiled kernels", PLATFORM, meta={"stages": ["unet"]})
    assert load_blob(path, PLATFORM) == b"compiled kernels"
    assert path.parent == tmp_path / "org--tiny-model-0123456789abcdef" / "runtime"


def test_keys_are_filesystem_safe_and_stable(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 8}')
    source = ModelSource(path=tmp_path, model_id="black-forest-labs/FLUX.1 dev:v2?", model_index={})
    key = model_key(source)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key)
    assert key.startswith("black-forest-labs--FLUX.1_dev_v2_-")
    assert key.endswith(source.content_hash)

    info = platform_info("torch", "cpu")
    assert info.key == platform_key("torch", "cpu")
    assert re.fullmatch(r"[a-z0-9._-]+", info.key)
    assert info.key.startswith("torch-cpu-")
    assert info.fields()["tools"]["torch"]
    assert platform_key("rtx", "cpu") != info.key  # the backend is part of the key: no collisions


# ---- concurrency and kills ---------------------------------------------------------------------------------


def _hammer(path: Path, writer: int, iterations: int) -> None:
    """Child process: load (must always get a whole payload) then save its own, again and again."""
    for i in range(iterations):
        data = load_blob(path, PLATFORM, timeout=20)
        if data is None or not _is_whole_payload(data):
            os._exit(3)
        if not save_blob(path, _payload(writer, i), PLATFORM, timeout=20):
            os._exit(4)
    os._exit(0)


@posix_only
def test_two_processes_saving_and_loading_at_once_both_succeed(tmp_path: Path) -> None:
    path = _model_cache(tmp_path).runtime_cache_path
    assert save_blob(path, _payload(0, 0), PLATFORM)
    workers = [FORK.Process(target=_hammer, args=(path, w, 25)) for w in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    data = load_blob(path, PLATFORM)
    assert data is not None and _is_whole_payload(data)
    assert data[:9] in (b"writer 1 ", b"writer 2 ")


def _save_until_killed(path: Path, data: bytes, where: str, reached: mp.synchronize.Event) -> None:
    """Child process: save, but freeze at `where` inside the save so the parent can kill it there."""
    if where == "mid-write":
        # The kernel itself kills the process (SIGXFSZ) once the temp file passes 64 KiB.
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    else:
        seen = []

        def freeze(name: str, args: tuple) -> None:
            if name == "tempfile.mkstemp" and str(args[0]).endswith(".tmp"):  # the save's, not the lock's
                seen.append(args[0])
            # "temp-opened": the temp file exists, nothing written yet; "before-rename": fully written.
            opened = where == "temp-opened" and name == "open" and isinstance(args[0], int)
            if seen and (opened or (where == "before-rename" and name == "os.rename")):
                reached.set()
                time.sleep(60)

        sys.addaudithook(freeze)
    save_blob(path, data, PLATFORM, timeout=5)
    os._exit(0)


@posix_only
@pytest.mark.parametrize("where", ["temp-opened", "mid-write", "before-rename"])
def test_process_killed_while_saving_leaves_previous_cache_intact(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _model_cache(tmp_path).runtime_cache_path
    old = _payload(0, 0, 1 << 10)
    assert save_blob(path, old, PLATFORM)

    reached = FORK.Event()
    child = FORK.Process(target=_save_until_killed, args=(path, _payload(1, 1, 1 << 20), where, reached))
    child.start()
    if where == "mid-write":
        child.join(20)
        assert child.exitcode == -signal.SIGXFSZ
    else:
        assert reached.wait(20), "the child never reached the point to be killed at"
        os.kill(child.pid, signal.SIGKILL)  # while it holds the lock, the temp file open
        child.join(20)
        assert child.exitcode == -signal.SIGKILL
    leftovers = [p.stat().st_size for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    full = len(encode_blob(_payload(1, 1, 1 << 20), PLATFORM))
    assert leftovers == [{"temp-opened": 0, "mid-write": 1 << 16, "before-rename": full}[where]]

    assert load_blob(path, PLATFORM, timeout=5) == old  # the kernel released the dead process's lock
    assert _warnings(caplog) == []
    assert save_blob(path, b"next", PLATFORM, timeout=5)
    assert load_blob(path, PLATFORM) == b"next"


# ---- damaged and foreign files ------------------------------------------------------------------------


def _damage(raw: bytes, how: str) -> bytes:
    if how == "truncated":
        return raw[: len(raw) - 100]
    if how == "truncated-header":
        return raw[:20]
    if how == "empty":
        return b""
    if how == "garbage":
        return os.urandom(4096)
    if how == "flipped-byte":
        return raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:]
    if how == "future-version":
        return raw[:8] + (99).to_bytes(4, "little") + raw[12:]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "truncated-header", "empty", "garbage", "flipped-byte", "future-version"]
)
def test_damaged_cache_file_is_a_miss_with_one_warning_and_is_replaced(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _model_cache(tmp_path).runtime_cache_path
    assert save_blob(path, _payload(0, 0, 4096), PLATFORM)
    path.write_bytes(_damage(path.read_bytes(), how))

    assert load_blob(path, PLATFORM) is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0] and "\n" not in warnings[0]

    assert save_blob(path, b"fresh", PLATFORM)
    assert load_blob(path, PLATFORM) == b"fresh"


def test_cache_of_another_platform_is_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _model_cache(tmp_path).runtime_cache_path
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_blob(b"kernels for another GPU", OTHER_PLATFORM))  # e.g. a copied folder

    assert load_blob(path, PLATFORM) is None
    assert "made for platform " + OTHER_PLATFORM in _warnings(caplog)[0]
    assert resolve_runtime_cache(_model_cache(tmp_path), shipped_dir=tmp_path / "no-shipped") is None


# ---- shipped caches ------------------------------------------------------------------------------------


def _ship(
    shipped: Path,
    cache: ModelCache,
    data: bytes,
    header_platform: str | None = None,
    driver: str | None = None,
) -> Path:
    """Put a prewarmed cache for `cache`'s model and platform into a shipped folder, as prewarm does (made
    under NVIDIA driver `driver`, recorded in the entry's platform fields and the file's header)."""
    folder = shipped / cache.model_key / cache.platform_key
    folder.mkdir(parents=True)
    file = folder / SHIPPED_FILE
    file.write_bytes(
        encode_blob(data, header_platform or cache.platform_key, meta={"driver_version": driver})
    )
    entry = ShippedCache(
        model_id="org/tiny-model",
        model_hash=cache.model_key.rsplit("-", 1)[1],
        model_key=cache.model_key,
        platform_key=cache.platform_key,
        backend=cache.platform_key.split("-")[0],
        precision="float32",
        platform={"key": cache.platform_key, "driver_version": driver},
        shapes=[{"batch": 1, "height": 64, "width": 64}],
        files={SHIPPED_FILE: {"sha256": sha256_file(file), "size": file.stat().st_size}},
    )
    update_manifest(shipped, entry)
    return file


def test_shipped_cache_is_copied_into_the_user_cache_never_changed(tmp_path: Path) -> None:
    cache = _model_cache(tmp_path / "user")
    shipped_file = _ship(tmp_path / "shipped", cache, b"prewarmed")
    before = (shipped_file.read_bytes(), shipped_file.stat().st_mtime_ns)

    resolved = resolve_runtime_cache(cache, shipped_dir=tmp_path / "shipped")
    assert resolved == cache.runtime_cache_path
    assert not resolved.is_symlink() and not resolved.samefile(shipped_file)
    assert load_blob(resolved, cache.platform_key) == b"prewarmed"

    assert save_blob(resolved, b"prewarmed + this user's shapes", cache.platform_key)
    assert (shipped_file.read_bytes(), shipped_file.stat().st_mtime_ns) == before
    # once the user has a valid cache, it wins over the shipped one
    assert resolve_runtime_cache(cache, shipped_dir=tmp_path / "shipped") == resolved
    assert load_blob(resolved, cache.platform_key) == b"prewarmed + this user's shapes"


def test_mismatched_or_damaged_shipped_caches_are_skipped_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.cache")
    shipped = tmp_path / "shipped"
    cache = _model_cache(tmp_path / "user")
    _ship(shipped, _model_cache(tmp_path / "user", OTHER_PLATFORM), b"for another GPU")
    assert resolve_runtime_cache(cache, shipped_dir=shipped) is None
    assert any("made for another platform" in m for m in caplog.messages)

    caplog.clear()
    shipped_file = _ship(shipped, cache, b"prewarmed")
    shipped_file.write_bytes(shipped_file.read_bytes()[:-3] + b"xyz")  # edited after shipping
    assert resolve_runtime_cache(cache, shipped_dir=shipped) is None
    assert any("sha256 differs from the manifest" in m for m in _warnings(caplog))
    assert not cache.runtime_cache_path.exists()


def test_manifest_lists_each_shipped_file_with_its_checksum(tmp_path: Path) -> None:
    cache = _model_cache(tmp_path / "user")
    file = _ship(tmp_path / "shipped", cache, b"prewarmed")
    _ship(tmp_path / "shipped", _model_cache(tmp_path / "user", OTHER_PLATFORM), b"other")
    entries = json.loads((tmp_path / "shipped" / "manifest.json").read_text())
    assert [e["platform_key"] for e in entries] == sorted([PLATFORM, OTHER_PLATFORM])
    mine = next(e for e in entries if e["platform_key"] == PLATFORM)
    assert mine["files"][SHIPPED_FILE]["sha256"] == sha256_file(file)
    assert set(asdict(ShippedCache.from_json(mine))) == set(mine)


def _gpu(backend: str, driver: str | None, **change: object) -> PlatformInfo:
    fields: dict = {
        "backend": backend,
        "device_type": "cuda",
        "device_name": "NVIDIA GeForce RTX 4090",
        "compute_capability": "8.9",
        "driver_version": driver,
        "cuda_version": "12.9",
        "tools": {"tensorrt_rtx": "1.7.1.116"} if backend == "rtx" else {"python": "3.11", "torch": "2.11.0"},
    }
    return PlatformInfo(**{**fields, **change})


@pytest.mark.parametrize("backend", ["rtx", "torch"])
def test_platform_key_is_exact_where_it_must_be_and_leaves_the_driver_out(backend: str) -> None:
    # the driver, as NVML (pynvml installed) or /proc gives it, or unknown: one key
    keys = {_gpu(backend, driver).key for driver in ("560.35.03", "560.35.05", "565.57.01", None)}
    assert len(keys) == 1
    key = keys.pop()
    tool = "tensorrt_rtx" if backend == "rtx" else "torch"
    others = [
        _gpu(backend, None, device_name="NVIDIA GeForce RTX 4080"),  # another SKU, same compute capability
        _gpu(backend, None, compute_capability="12.0"),
        _gpu(backend, None, cuda_version="13.0"),
        _gpu(backend, None, tools={**_gpu(backend, None).tools, tool: "9.9.9"}),
    ]
    assert all(info.key != key for info in others)
    assert len({info.key for info in others}) == len(others)


def test_platform_key_does_not_depend_on_pynvml_being_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    keys = []
    for module in (None, types.SimpleNamespace()):  # absent (import fails), then present (and unusable here)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        keys += [platform_key("torch", "cpu"), platform_key("rtx", "cpu")]
    assert keys[:2] == keys[2:]


@pytest.mark.parametrize(
    ("backend", "made_with", "here", "matches"),
    [
        ("torch", "550.54.14", "560.35.03", True),  # torch: any driver
        ("torch", "565.57.01", "560.35.03", True),
        ("rtx", "555.42.06", "560.35.03", True),  # rtx: a driver at least as new as the one that made it
        ("rtx", "565.57.01", "560.35.03", False),
    ],
)
def test_shipped_cache_made_on_another_driver_build_matches_where_the_backend_allows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: str, made_with: str, here: str, matches: bool
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.cache")
    key = _gpu(backend, made_with).key
    assert key == _gpu(backend, here).key  # the user's machine has the same key
    maker = ModelCache(tmp_path / "maker", "org--tiny-model-0123456789abcdef", key, made_with)
    _ship(tmp_path / "shipped", maker, b"prewarmed", driver=made_with)
    user = ModelCache(tmp_path / "user", maker.model_key, key, here)

    resolved = resolve_runtime_cache(user, shipped_dir=tmp_path / "shipped")

    assert (resolved == user.runtime_cache_path) == matches
    if not matches:
        assert any(
            f"made with NVIDIA driver {made_with}" in m and "update the driver" in m for m in caplog.messages
        )


# ---- --cache-info and --clear-cache ---------------------------------------------------------------------


def test_clear_cache_removes_only_what_the_app_made(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cache = _model_cache(root)
    other = ModelCache(root, "tiny-sd-fedcba9876543210", PLATFORM)
    for c in (cache, other):
        c.onnx_dir.mkdir(parents=True)
        (c.onnx_dir / "unet.onnx").write_bytes(b"onnx")
        c.engine_dir.mkdir(parents=True)
        (c.engine_dir / "unet.engine").write_bytes(b"engine")
        assert save_blob(c.runtime_cache_path, b"cache", PLATFORM)
    (root / "models" / "tiny-sd").mkdir(parents=True)
    (root / "models" / "tiny-sd" / "model_index.json").write_text("{}")
    user_files = [
        root / "notes.txt",
        root / "my-models" / "weights.safetensors",
        root / "models" / "my-finetune" / "model_index.json",
        cache.model_dir / "my-notes.txt",
    ]
    for f in user_files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("mine")

    removed = clear_cache(root)

    assert all(f.read_text() == "mine" for f in user_files)
    assert not other.model_dir.exists() and other.model_dir in removed
    for c in (cache, other):
        assert not c.onnx_dir.exists() and not c.engine_dir.exists() and not c.runtime_cache_path.exists()
    assert not (root / "models" / "tiny-sd").exists()
    assert clear_cache(root) == []


def test_cache_info_says_what_is_cached_and_which_shipped_cache_matches(tmp_path: Path) -> None:
    cache = _model_cache(tmp_path / "user")
    assert save_blob(cache.runtime_cache_path, b"x" * 3000, PLATFORM)
    _ship(tmp_path / "shipped", cache, b"prewarmed")
    _ship(tmp_path / "shipped", _model_cache(tmp_path / "user", OTHER_PLATFORM), b"other")

    text = cache_info(tmp_path / "user", shipped_dir=tmp_path / "shipped", platform_keys=[PLATFORM])

    assert cache.model_key in text
    assert re.search(rf"runtime cache \[{re.escape(PLATFORM)}\]: 3\.\d KiB", text)
    matches = [line for line in text.splitlines() if "MATCHES this platform" in line]
    assert len(matches) == 1 and PLATFORM in matches[0]
