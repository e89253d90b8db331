"""Finding a model (local folder, hub id, built-in tiny model) and reading its parts.

`ModelSource` is everything about a model except its weights: the folder, `model_index.json`, each
component's config, the tokenizers and the scheduler. Weights are loaded by a backend when it needs them
(`load_component`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

TINY_MODELS = ("tiny-flux", "tiny-sd", "tiny-sdxl")

# Files a hub download needs: configs, tokenizers, weights (safetensors only, no pickles).
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]


@dataclass
class ModelSource:
    """A diffusers-format model folder, read without loading weights."""

    path: Path
    model_id: str
    model_index: dict[str, Any]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def load_component(self, component: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> Any:
        """Load one component's module (weights) in eval mode, as diffusers' from_pretrained would."""
        import diffusers
        import transformers

        library, cls = self.component_class(component)
        if self.random_weights:
            from .architectures import build_random

            logger.info("building %s (%s) from its config with random weights", component, cls)
            return build_random(library, cls, self.path / component, dtype, device)
        lib = diffusers if library == "diffusers" else transformers
        module_cls = getattr(lib, cls)
        logger.debug("loading %s (%s.%s) as %s", component, library, cls, dtype)
        module = module_cls.from_pretrained(self.path / component, torch_dtype=dtype)
        return module.to(device).eval().requires_grad_(False)

    @cached_property
    def content_hash(self) -> str:
        """Hash of every config and the size+mtime-free identity of the weights (their safetensors headers).

        Reading whole weight files would take minutes for FLUX; a safetensors header lists every tensor's
        name, dtype, shape and byte offsets, and any weight change that keeps all of those is caught by the
        file's size-independent content hash of the first and last megabyte.
        """
        h = hashlib.sha256()
        for file in sorted(self.path.rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            rel = file.relative_to(self.path).as_posix()
            h.update(rel.encode())
            if file.suffix in (".json", ".txt", ".model"):
                h.update(file.read_bytes())
            elif file.suffix in (".safetensors", ".bin"):
                size = file.stat().st_size
                h.update(str(size).encode())
                with file.open("rb") as f:
                    h.update(f.read(1 << 20))
                    if size > 2 << 20:
                        f.seek(-(1 << 20), 2)
                        h.update(f.read(1 << 20))
        return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def read_model(path: Path, model_id: str | None = None) -> ModelSource:
    """Read a local diffusers-format folder (no weights)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UnsupportedModelError(f"{path} is not a diffusers model folder: it has no model_index.json")
    model_index = _read_json(index_file)
    source = ModelSource(path=path, model_id=model_id or str(path), model_index=model_index)
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
    from .cache import cache_root

    path = Path(model).expanduser()
    if path.is_dir():
        return read_model(path.resolve())
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
        return read_model(folder, model_id=name)
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is not a folder")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {name!r} is neither a folder nor a Hugging Face hub id (org/name), nor a built-in ({', '.join((*TINY_MODELS, *ARCHITECTURES))})"
        )
    return read_model(_download(name, local_files_only=local_files_only), model_id=name)


def _download(repo_id: str, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=local_files_only)
        )
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face hub: accept its license there and log in "
            "(`hf auth login`), then retry"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} was not found on the Hugging Face hub") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id} is not in the local hub cache and the Hugging Face hub cannot be reached "
            "(offline?): download it once with network access, or pass a local folder"
        ) from e
    except OSError as e:  # connection errors surface as OSError subclasses (requests/httpx)
        raise ModelNotFoundError(f"could not download {repo_id} from the Hugging Face hub: {e}") from e
