"""The pipeline's LoRA methods, with diffusers' names (`LoraLoaderMixin`'s): a mixin over `LoraAdapters`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters import LoraAdapters


class LoraMethods:
    """`load_lora_weights`, `set_adapters`, ... for a pipeline with `backend`, `source`, `_lora` (None until
    the first LoRA) and `_on_stream()` (the context its weight writes run in)."""

    backend: Any
    source: Any
    _lora: LoraAdapters | None

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    @property
    def lora(self) -> LoraAdapters:
        """The loaded LoRA adapters (merged into the weights in place: nothing recompiles or rebuilds)."""
        if self._lora is None:
            from .adapters import adapters_for

            self._lora = adapters_for(self.backend, self.source)
        return self._lora

    def load_lora_weights(
        self,
        pretrained_model_name_or_path: str | Path,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        *,
        local_files_only: bool = False,
    ) -> str:
        """Load a LoRA (.safetensors file, folder or hub id; diffusers/PEFT or kohya/A1111 format) and make
        it the active adapter. Returns its adapter name."""
        with self._on_stream():
            return self.lora.load(
                pretrained_model_name_or_path, weight_name, adapter_name, local_files_only=local_files_only
            )

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None
    ) -> None:
        """Activate these adapters with these weights (1.0 each by default); the others are switched off."""
        with self._on_stream():
            self.lora.set_adapters(adapter_names, adapter_weights)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        with self._on_stream():
            self.lora.delete_adapters(adapter_names)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the weights are the model's own again."""
        if self._lora is not None:
            with self._on_stream():
                self._lora.unload()

    def get_active_adapters(self) -> list[str]:
        return self._lora.get_active_adapters() if self._lora is not None else []
