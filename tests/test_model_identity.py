"""The model key changes with any byte of the weights, and later starts do not read the weights again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.cache import hashes
from pipeline.loading import resolve_model

# A fresh process: which weight files does finding each model's key open?
OPENS = """
import json, sys
from pathlib import Path
from pipeline.loading import resolve_model
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                 if event == "open" and str(args[0]).endswith(".safetensors") else None)
results = []
for folder in sys.argv[2:]:
    opened.clear()
    source = resolve_model(folder, cache_dir=Path(sys.argv[1]))
    results.append({"hash": source.content_hash, "opened": list(opened), "stats": source.hash_stats})
print(json.dumps(results))
"""


def _weights(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _flip_middle_byte_keeping_mtime(file: Path) -> None:
    """Change one byte in the middle, then put size and mtime back as they were (what `cp -p` of a re-saved
    fine-tune with the same layout does): only the content, and the kernel's ctime, differ."""
    stat = file.stat()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    with file.open("r+b") as f:  # same inode
        f.write(data)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns


def _start(cache: Path, *folders: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", OPENS, str(cache), *map(str, folders)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_one_flipped_byte_changes_the_model_key_and_later_starts_read_no_weights(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hash files at once, however fresh (the copy below is seconds old; real models are not)
    monkeypatch.setattr(hashes, "SETTLE_S", -60.0)
    folder = shutil.copytree(tiny_sd, tmp_path / "model")
    cache = tmp_path / "cache"
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", cache_dir=cache)
    key = pipe.model_cache.model_key
    weight_files = len(list(folder.rglob("*.safetensors")))
    assert pipe.source.hash_stats == {"remembered": 0, "read": weight_files}
    assert (cache / hashes.HASHES_FILE).is_file()

    # a second start, in a new process: the key from the remembered hashes, no weight file opened
    (again,) = _start(cache, folder)
    assert again["opened"] == []
    assert again["stats"] == {"remembered": weight_files, "read": 0}
    assert key.endswith(again["hash"])

    _flip_middle_byte_keeping_mtime(_weights(folder))
    changed = Pipeline.from_pretrained(folder, backend="torch", device="cpu", cache_dir=cache)
    assert changed.model_cache.model_key != key
    assert changed.model_cache.model_key.rsplit("-", 1)[0] == key.rsplit("-", 1)[0]  # same name, new hash
    assert changed.source.hash_stats == {"remembered": weight_files - 1, "read": 1}  # only the changed file


def test_a_file_changed_just_before_hashing_is_not_remembered(tiny_sd: Path, tmp_path: Path) -> None:
    """A write within the filesystem's timestamp granularity after hashing would go unseen: such a file is
    hashed again at the next start instead."""
    folder = shutil.copytree(tiny_sd, tmp_path / "model")  # every file's ctime: just now
    first = resolve_model(folder, cache_dir=tmp_path / "cache")
    assert first.content_hash
    second = resolve_model(folder, cache_dir=tmp_path / "cache")
    assert second.content_hash == first.content_hash
    assert second.hash_stats["remembered"] == 0 and second.hash_stats["read"] > 0


def test_hub_snapshots_are_known_by_their_commit_without_reading_weights(
    tiny_sd: Path, tmp_path: Path
) -> None:
    snapshots = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    commits = ["a" * 40, "b" * 40]
    folders = [shutil.copytree(tiny_sd, snapshots / commit) for commit in commits]
    results = _start(tmp_path / "cache", *folders)
    assert all(r["opened"] == [] for r in results)
    assert results[0]["hash"] != results[1]["hash"]  # same files, other commit: another model key
    assert not (tmp_path / "cache" / hashes.HASHES_FILE).exists()
