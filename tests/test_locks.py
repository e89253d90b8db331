"""Real processes contending for the cache: a second one waits for a long export and says for whom; bounded
waits end in a typed error, never a filelock traceback; what a SIGKILLed writer left is swept later."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import CacheBusyError
from pipeline.cache import (
    ModelCache,
    ShippedCache,
    load_blob,
    save_blob,
    sweep_temps,
    update_manifest,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")
PLATFORM = "torch-cpu-x86_64-avx2-py3.11-torch2.13.0_cpu"

# Holds the lock of argv[1] with purpose argv[2] until a line arrives on stdin.
HOLD = """
import sys
from pipeline.cache import file_lock
with file_lock(sys.argv[1], None, purpose=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""

# Runs argv[3] as python code after installing an audit hook that freezes the process (so that it can be
# killed there) at the first event named argv[1] on a path inside a temp entry of folder argv[2].
FREEZE_AT = """
import sys, time
event_name, prefix = sys.argv[1], sys.argv[2] + "/."
def freeze(event, args):
    if event == event_name and args and str(args[0]).startswith(prefix) and ".tmp" in str(args[0]):
        print("frozen", flush=True)
        time.sleep(600)
sys.addaudithook(freeze)
exec(sys.argv[3])
"""


class _Holder:
    """A real process holding a lock until released."""

    def __init__(self, path: Path, purpose: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path), purpose],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def _lines(stream) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], text: str, seen: list[str], timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} in {seen}")


def _age(path: Path, seconds: float) -> None:
    """Make `path` (and everything in it) look untouched for `seconds`: a later start, sooner."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@posix_only
@pytest.mark.slow  # a real ONNX export in a second process: ~30 s on a 2-core CPU
def test_second_export_waits_for_the_first_saying_for_whom_then_proceeds(
    tiny_sd: Path, tmp_path: Path
) -> None:
    out = tmp_path / "onnx"
    out.mkdir()
    holder = _Holder(out / "manifest.json", "exporting tiny-sd to ONNX (the first process)")
    second = subprocess.Popen(
        [sys.executable, "-m", "export", str(tiny_sd), "--out", str(out), "--stages", "text_encoder"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen: list[str] = []
        line = _wait_for(_lines(second.stderr), "waiting for", seen)
        assert f"pid {holder.proc.pid}" in line and "(the first process)" in line, line
        time.sleep(1)
        assert (
            second.poll() is None and not (out / "text_encoder.onnx").exists()
        )  # it waits, it does not fail
    finally:
        holder.release()
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, "".join(seen) + stderr
    assert stdout.strip() == f"text_encoder: {out / 'text_encoder.onnx'}"
    assert "Traceback" not in "".join(seen) + stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "text_encoder.onnx",
    ]  # no lock file left


@posix_only
def test_bounded_waits_end_in_a_typed_error_naming_the_holder(tmp_path: Path, caplog) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    cache = ModelCache(tmp_path / "user", "org--tiny-model-0123456789abcdef", PLATFORM)
    assert save_blob(cache.runtime_cache_path, b"kernels", PLATFORM)
    entry = ShippedCache("org/tiny-model", "0123456789abcdef", cache.model_key, PLATFORM, "torch", "float32")

    manifest_holder = _Holder(shipped / "manifest.json", "prewarming (another process)")
    try:
        with pytest.raises(CacheBusyError, match=rf"pid {manifest_holder.proc.pid}, prewarming"):
            update_manifest(shipped, entry, timeout=0.5)
    finally:
        manifest_holder.release()
    update_manifest(shipped, entry, timeout=0.5)  # free again: it goes through

    cache_holder = _Holder(cache.runtime_cache_path, "saving a cache file (another process)")
    try:
        assert load_blob(cache.runtime_cache_path, PLATFORM, timeout=0.5) is None  # a miss, not a crash
    finally:
        cache_holder.release()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"pid {cache_holder.proc.pid}" in warnings[0]
    assert load_blob(cache.runtime_cache_path, PLATFORM, timeout=0.5) == b"kernels"


def _killed_at(event: str, folder: Path, code: str) -> None:
    """Run `code` in a new process, SIGKILL it once it reaches `event` on a temp path in `folder`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FREEZE_AT, event, str(folder), code], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "frozen", "the process ended before the point to kill it at"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@posix_only
def test_temp_file_of_a_killed_cache_save_is_swept_once_stale_and_unlocked(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, "org--tiny-model-0123456789abcdef", PLATFORM)
    path = cache.runtime_cache_path
    code = f"from pipeline.cache import save_blob; save_blob({str(path)!r}, b'x' * 100000, {PLATFORM!r})"
    _killed_at("os.rename", path.parent, code)  # written, fsynced, not yet renamed into place
    (leftover,) = _temps(path.parent)
    assert not path.exists()

    swept = cache.sweep_leftovers()
    assert [p.name for p in swept] == [f"{path.name}.lock"]  # the dead writer's lock file, not its fresh temp
    assert leftover.exists()  # fresh: it could be a live write
    _age(leftover, 3600)
    holder = _Holder(path, "saving a cache file (a live process)")
    try:
        assert sweep_temps(path.parent) == []  # stale, but its target is locked
    finally:
        holder.release()
    assert leftover in cache.sweep_leftovers()
    assert _temps(path.parent) == [] and list(path.parent.iterdir()) == []  # nor a lock file


@posix_only
@pytest.mark.slow  # a real ONNX export, killed: ~25 s on a 2-core CPU
def test_temp_folder_of_a_killed_export_is_swept_at_a_later_start(tiny_sd: Path, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, "tiny-sd-0123456789abcdef", "rtx-test-platform")
    out = cache.onnx_dir  # where the rtx backend exports on first use
    code = (
        "from pipeline.export import export_model; "
        f"export_model({str(tiny_sd)!r}, {str(out)!r}, stages=['text_encoder'])"
    )
    _killed_at("os.rename", out, code)  # the ONNX written into its temp folder, not moved into place
    (leftover,) = _temps(out)
    assert leftover.is_dir() and (leftover / "text_encoder.onnx").is_file()
    assert (out / "manifest.json.lock").exists()  # the dead process's lock file (no longer locked)

    _age(leftover, 3600)
    assert set(cache.sweep_leftovers()) == {leftover, out / "manifest.json.lock"}
    assert list(out.iterdir()) == []  # (export_model sweeps its folder the same way before exporting)


@posix_only
def test_half_made_model_folder_of_a_killed_process_is_swept_at_a_later_start(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    code = (
        f"from pipeline.loading import resolve_model; resolve_model('tiny-sd', cache_dir={str(cache_dir)!r})"
    )
    models = cache_dir / "models"
    _killed_at("open", models, code)  # the first file written into the temp model folder
    (leftover,) = _temps(models)
    assert not (models / "tiny-sd").exists()

    _age(leftover, 3600)
    from pipeline.loading import resolve_model

    source = resolve_model("tiny-sd", cache_dir=cache_dir)
    assert (source.path / "model_index.json").is_file()
    assert sorted(p.name for p in models.iterdir()) == ["tiny-sd"]
    assert (
        json.loads((source.path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    )
