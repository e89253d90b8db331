"""Finding a model (local folder, hub id, built-in tiny model) and reading its parts.

`ModelSource` is everything about a model except its weights: the folder, `model_index.json`, each
component's config, the tokenizers and the scheduler. Weights are loaded by a backend when it needs them
(`load_component`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import ModelNotFoundError, UnsupportedModelError
from .tiny import TINY_MODELS

logger = logging.getLogger(__name__)

# Files a hub download needs: configs, tokenizers, weights (safetensors only, no pickles).
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
# Small text files a model's identity reads whole each time; every other file is hashed once (cache/hashes.py).
_TEXT_SUFFIXES = (".json", ".txt", ".model")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_revision(path: Path) -> str | None:
    """The commit of a Hugging Face hub snapshot folder (`.../models--org--name/snapshots/<commit>`), else
    None. A snapshot's files are fixed by its commit: the commit identifies the weights without reading them."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name if _COMMIT.match(path.name) else None
    return None


@contextlib.contextmanager
def quiet_hub_output() -> Iterator[None]:
    """Inside, transformers' and diffusers' own progress bars (one per loaded or saved component: "Loading
    weights", "Writing model shards") are off; the pipeline's own log lines say what loads. Restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    enabled = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, enabled, strict=True):
            if was:
                lib.enable_progress_bar()


@dataclass
class ModelSource:
    """A diffusers-format model folder, read without loading weights."""

    path: Path
    model_id: str
    model_index: dict[str, Any]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_dir: Path | None = None  # the cache root where weight-file hashes are remembered (None: default)
    # after content_hash: how many weight files were "remembered" (not read) and "read"
    hash_stats: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def random_weights(self) -> bool:
        """A config-only folder (pipeline.architectures): modules are built with random weights."""
        from .architectures import RANDOM_WEIGHTS_MARKER

        return (self.path / RANDOM_WEIGHTS_MARKER).is_file()

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name", ""))

    def component_class(self, component: str) -> tuple[str, str]:
        library, cls = self.model_index[component]
        return library, cls

    @cached_property
    def scheduler(self) -> Any:
        import diffusers

        _, cls = self.component_class("scheduler")
        scheduler_cls = getattr(diffusers, cls, None)
        if scheduler_cls is None:
            raise UnsupportedModelError(f"scheduler {cls} is not known to diffusers {diffusers.__version__}")
        return scheduler_cls.from_pretrained(self.path, subfolder="scheduler")

    def tokenizer(self, component: str) -> Any:
        import transformers

        _, cls = self.component_class(component)
        return getattr(transformers, cls).from_pretrained(self.path / component)

    def load_component(
        self,
        component: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        per_part: Callable[[torch.nn.Module], object] | None = None,
    ) -> Any:
        """Load one component's module (weights) in eval mode, as diffusers' from_pretrained would.

        `per_part(module)` runs after each part (block) of the module reaches `device` (see `place_in_parts`):
        fp8 quantizes there while loading, so the whole bf16 model is never on the device."""
        import diffusers
        import transformers

        library, cls = self.component_class(component)
        if self.random_weights:
            from .architectures import build_random

            logger.info("building %s (%s) from its config with random weights", component, cls)
            return build_random(library, cls, self.path / component, dtype, device, per_part=per_part)
        lib = diffusers if library == "diffusers" else transformers
        module_cls = getattr(lib, cls)
        logger.debug("loading %s (%s.%s) as %s", component, library, cls, dtype)
        with quiet_hub_output():
            module = module_cls.from_pretrained(self.path / component, torch_dtype=dtype)
        module.eval().requires_grad_(False)
        if per_part is None:
            return module.to(device)
        return place_in_parts(module, torch.device(device), per_part)

    @cached_property
    def content_hash(self) -> str:
        """A hash that changes when any byte of the model changes: every config and tokenizer file, and the
        sha256 of every other file (the weights), or, for a hub snapshot, its commit.

        A local folder's weight files are read whole once; the result is remembered by file identity (path,
        size, mtime, ctime, inode) in the cache root (cache/hashes.py), so later starts read no weights.
        """
        from .cache.hashes import FileHashes
        from .cache.store import cache_root

        revision = hub_revision(self.path)
        hashes = FileHashes(cache_root(self.cache_dir)) if revision is None else None
        h = hashlib.sha256()
        if revision is not None:
            h.update(f"hub commit {revision}\n".encode())
        for file in sorted(self.path.rglob("*")):
            rel = file.relative_to(self.path)
            if any(part.startswith(".") for part in rel.parts) or not file.is_file():
                continue
            h.update(rel.as_posix().encode() + b"\0")
            if file.suffix in _TEXT_SUFFIXES:
                h.update(hashlib.sha256(file.read_bytes()).digest())
            elif hashes is not None:
                h.update(bytes.fromhex(hashes.digest(file)))
        if hashes is not None:
            hashes.save()
            self.hash_stats = {"remembered": hashes.hits, "read": hashes.misses}
        return h.hexdigest()[:16]


def module_parts(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """`module` cut into parts that hold every parameter once, in `named_parameters` order: (part, recurse).
    A container's own parameters are a part of their own (recurse False); the elements of a ModuleList or
    Sequential (a model's blocks) are parts one by one; any other child is one part."""
    parts: list[tuple[torch.nn.Module, bool]] = [(module, False)]
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
            parts.append((child, False))
            parts.extend((block, True) for block in child)
        else:
            parts.append((child, True))
    return parts


def place_in_parts(
    module: torch.nn.Module,
    device: torch.device,
    per_part: Callable[[torch.nn.Module], object],
    init: Callable[[torch.nn.Module, bool], None] | None = None,
) -> torch.nn.Module:
    """Move `module` to `device` part by part, calling `per_part(module)` after each one. With `init`,
    `module` was built on the meta device: each part is allocated on `device` and `init(part, recurse)` fills
    it (random weights drawn in the same order as for a whole module)."""
    for part, recurse in module_parts(module):
        if init is not None:
            part.to_empty(device=device, recurse=recurse)
            init(part, recurse)
        else:
            part._apply(lambda t: t.to(device), recurse=recurse)
        per_part(module)
    return module


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def read_model(path: Path, model_id: str | None = None, cache_dir: Path | None = None) -> ModelSource:
    """Read a local diffusers-format folder (no weights). `cache_dir`: the cache root (default: the usual)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UnsupportedModelError(f"{path} is not a diffusers model folder: it has no model_index.json")
    model_index = _read_json(index_file)
    source = ModelSource(
        path=path, model_id=model_id or str(path), model_index=model_index, cache_dir=cache_dir
    )
    for component, value in model_index.items():
        if component.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        for name in ("config.json", "scheduler_config.json"):
            cfg = path / component / name
            if cfg.is_file():
                source.configs[component] = _read_json(cfg)
    return source


def resolve_model(
    model: str | Path, *, cache_dir: Path | None = None, local_files_only: bool = False
) -> ModelSource:
    """A local folder, a built-in tiny model name, or a Hugging Face hub id -> ModelSource."""
    from .architectures import ARCHITECTURES, make_architecture
    from .cache.store import cache_root

    path = Path(model).expanduser()
    if path.is_dir():
        return read_model(path.resolve(), cache_dir=cache_dir)
    name = str(model)
    if name in TINY_MODELS or name in ARCHITECTURES:
        folder = cache_root(cache_dir) / "models" / name
        if not (folder / "model_index.json").is_file():
            logger.info("creating built-in random-weight model %s in %s", name, folder)
            if name in TINY_MODELS:
                from .tiny import make_tiny_model

                make_tiny_model(name, folder)
            else:
                make_architecture(name, folder)
        return read_model(folder, model_id=name, cache_dir=cache_dir)
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is not a folder")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {name!r} is neither a folder nor a Hugging Face hub id (org/name), nor a built-in ({', '.join((*TINY_MODELS, *ARCHITECTURES))})"
        )
    return read_model(_download(name, local_files_only=local_files_only), model_id=name, cache_dir=cache_dir)


def _download(repo_id: str, *, local_files_only: bool) -> Path:
    return hub_snapshot(
        repo_id,
        _HUB_PATTERNS,
        local_files_only=local_files_only,
        error=ModelNotFoundError,
        alternative="a local folder",
    )


def hub_snapshot(
    repo_id: str,
    patterns: list[str],
    *,
    local_files_only: bool,
    error: type[Exception],
    what: str = "",
    alternative: str,
) -> Path:
    """A Hugging Face hub snapshot of `repo_id` (only files matching `patterns`), downloaded once; every
    hub failure becomes `error` with one line that says what to do (`what` names the thing, e.g. "LoRA")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = f"{what} {repo_id}".strip()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
    except GatedRepoError as e:
        raise error(
            f"{name} is gated on the Hugging Face hub: accept its license there and log in "
            "(`hf auth login`), then retry"
        ) from e
    except RepositoryNotFoundError as e:
        raise error(f"{name} was not found on the Hugging Face hub") from e
    except LocalEntryNotFoundError as e:
        raise error(
            f"{name} is not in the local hub cache and the Hugging Face hub cannot be reached "
            f"(offline?): download it once with network access, or pass {alternative}"
        ) from e
    except OSError as e:  # connection errors surface as OSError subclasses (requests/httpx)
        raise error(f"could not download {name} from the Hugging Face hub: {e}") from e
