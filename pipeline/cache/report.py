"""`--cache-info` and `--clear-cache`: what the app has cached where, and removing only what it made."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .blob import BadCacheFile, _reason, read_blob_header
from .platform import platform_key
from .shipped import SHIPPED_FILE, read_manifest, shipped_caches_dir

# Sub-layout the app owns inside a model folder; `clear_cache` removes these and nothing else.
_MODEL_SUBDIRS = ("onnx", "engines", "runtime")
_MODEL_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*-[0-9a-f]{16}$")


def current_platform_keys() -> list[str]:
    """Platform keys of this machine for each backend that can run here (torch always; rtx with a GPU)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = [platform_key("torch", device)]
    if device.type == "cuda":
        keys.insert(0, platform_key("rtx", device))
    return keys


def cache_info(
    root: str | Path,
    *,
    shipped_dir: str | Path | None = None,
    platform_keys: list[str] | None = None,
) -> str:
    """A report of what is cached where: models, ONNX, engines, runtime caches (sizes, platform keys), and
    which shipped caches match this machine's platform."""
    root = Path(root)
    shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_caches_dir()
    current = platform_keys if platform_keys is not None else current_platform_keys()
    lines = [f"cache folder: {root}" + ("" if root.is_dir() else " (empty)")]
    lines += [f"this platform: {key}" for key in current]
    models = root / "models"
    if models.is_dir():
        for folder in sorted(p for p in models.iterdir() if p.is_dir()):
            lines.append(f"  model {folder.name}: {_size(_tree_size(folder))}  {folder}")
    for model_dir in _model_dirs(root):
        lines.append(f"  {model_dir.name}/  {_size(_tree_size(model_dir))}")
        onnx = model_dir / "onnx"
        if onnx.is_dir():
            n = sum(1 for p in onnx.glob("*.onnx"))
            lines.append(f"    onnx: {n} stage(s), {_size(_tree_size(onnx))}")
        engines = model_dir / "engines"
        if engines.is_dir():
            for folder in sorted(p for p in engines.iterdir() if p.is_dir()):
                sets = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
                for engine_set in sets:
                    n = sum(1 for p in engine_set.glob("*.engine"))
                    if not n:
                        continue
                    name = folder.name if engine_set == folder else f"{folder.name}/{engine_set.name}"
                    lines.append(f"    engines [{name}]: {n} engine(s), {_size(_tree_size(engine_set))}")
                    lines += [f"      {line}" for line in _plan_lines(engine_set)]
        runtime = model_dir / "runtime"
        if runtime.is_dir():
            for file in sorted(runtime.glob("*.cache")):
                lines.append(f"    runtime cache [{file.stem}]: {_describe_blob(file, file.stem)}")
    lines.append(f"shipped caches: {shipped_dir}")
    try:
        entries = read_manifest(shipped_dir)
    except BadCacheFile as e:
        lines.append(f"  unreadable: {e}")
        entries = []
    if not entries:
        lines.append("  none")
    for entry in entries:
        path = shipped_dir / entry.folder / SHIPPED_FILE
        size = entry.files.get(SHIPPED_FILE, {}).get("size", 0)
        shapes = ", ".join(f"{s.get('batch', 1)}x{s['height']}x{s['width']}" for s in entry.shapes)
        mark = "MATCHES this platform" if entry.platform_key in current else "other platform"
        state = "" if path.is_file() else " (file missing)"
        lines.append(
            f"  {entry.folder}: {entry.precision}, shapes {shapes or '-'}, {_size(size)}, {mark}{state}"
        )
    return "\n".join(lines)


def _plan_lines(folder: Path) -> list[str]:
    """The memory plan of an engine set from its `<stage>.json` files (pipeline/engines/memory.py)."""
    import json

    from ..engines.memory import MemoryPlan

    metadata = {}
    for meta_file in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and "weight_bytes" in meta
            and (folder / f"{meta_file.stem}.engine").is_file()
        ):
            metadata[meta_file.stem] = meta
    denoiser = next((n for n, meta in metadata.items() if meta.get("denoiser")), None)
    if denoiser is None:
        return []
    return ["memory plan:", *(f"  {line}" for line in MemoryPlan.from_metadata(metadata, denoiser).lines())]


def _describe_blob(path: Path, platform_key: str) -> str:
    size = _size(path.stat().st_size)
    try:
        header = read_blob_header(path)
    except (BadCacheFile, OSError) as e:
        return f"{size}, unusable ({_reason(e)})"
    if header.platform_key != platform_key:
        return f"{size}, unusable (made for platform {header.platform_key})"
    return f"{size}, created {header.created_at}"


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _MODEL_KEY_RE.match(p.name))


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def clear_cache(root: str | Path) -> list[Path]:
    """Remove what the app made under `root` and return the removed paths.

    Removed: `<model-key>/{onnx,engines,runtime}/` and the built-in models in `models/`; folders left
    empty by that. Anything else (a file a user put there, an unknown folder) is kept.
    """
    from ..architectures import ARCHITECTURES
    from ..tiny import TINY_MODELS

    root = Path(root)
    removed: list[Path] = []
    for model_dir in _model_dirs(root):
        for name in _MODEL_SUBDIRS:
            _remove(model_dir / name, removed)
        _remove_if_empty(model_dir, removed)
    models = root / "models"
    for name in (*TINY_MODELS, *ARCHITECTURES):
        _remove(models / name, removed)
        for tmp in models.glob(f".{name}.*"):  # half-made by an interrupted make_tiny_model
            _remove(tmp, removed)
    _remove_if_empty(models, removed)
    return removed


def _remove(path: Path, removed: list[Path]) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return
    removed.append(path)


def _remove_if_empty(path: Path, removed: list[Path]) -> None:
    try:
        path.rmdir()
    except OSError:  # missing, or holds something the app did not make
        return
    removed.append(path)
