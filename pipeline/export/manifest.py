"""`manifest.json` of an ONNX folder: one entry per exported stage (tensors, source, hash, dtype, opset,
versions, the ONNX file's size and sha256). An entry is dropped before its stage's files are replaced and
written last, so an entry always vouches for complete files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def read_manifest(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The stage entries of `out_dir/manifest.json`; an absent or unreadable manifest has none."""
    path = Path(out_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s); treating every stage as not exported", path, e)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != MANIFEST_FORMAT
        or not isinstance(data.get("stages"), dict)
    ):
        logger.warning("%s has an unknown format; treating every stage as not exported", path)
        return {}
    return data["stages"]


def write_manifest(out_dir: Path, stages: Mapping[str, dict[str, Any]]) -> None:
    data = {"format": MANIFEST_FORMAT, "stages": dict(sorted(stages.items()))}
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=2) + "\n")


def set_entry(out_dir: Path, stage: str, entry: dict[str, Any] | None) -> None:
    stages = read_manifest(out_dir)
    if entry is None:
        if stage not in stages:
            return
        del stages[stage]
    else:
        stages[stage] = entry
    write_manifest(out_dir, stages)


def entry_problem(out_dir: Path, entry: Mapping[str, Any], identity: Mapping[str, Any]) -> str | None:
    """Why a manifest entry cannot be trusted for `identity` (None when it can)."""
    for key, value in identity.items():
        if entry.get(key) != value:
            return f"{key} changed"
    onnx_file = out_dir / str(entry.get("file"))
    if not onnx_file.is_file() or onnx_file.stat().st_size != entry.get("size"):
        return f"{onnx_file.name} is missing or has another size"
    data = entry.get("external_data")
    if data is not None:
        data_file = out_dir / str(data)
        if not data_file.is_file() or data_file.stat().st_size != entry.get("data_size"):
            return f"{data_file.name} is missing or has another size"
    if sha256_file(onnx_file) != entry.get("sha256"):
        return f"{onnx_file.name} has another checksum"
    return None
