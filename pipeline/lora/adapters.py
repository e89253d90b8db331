"""The adapters of one pipeline: loaded, active with their weights, merged into a WeightStore."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraError
from .files import LoraFile, check_scale, resolve_lora
from .reading import read_factors
from .weights import Factor, InPlaceWeights, Restore, Term, WeightStore

if TYPE_CHECKING:
    from ..engines import Backend
    from ..loading import ModelSource

logger = logging.getLogger("pipeline.lora")

HASH_PREFIX = 10  # sha256 characters recorded in PNG metadata, as A1111's "AutoV2" LoRA hashes


@dataclass
class Adapter:
    name: str
    file: LoraFile
    factors: list[Factor]

    @property
    def keys(self) -> set[str]:
        return {f.site.key for f in self.factors}


@dataclass
class LoraStats:
    load_s: float = 0.0  # the last load: read, convert, place the factors
    switch_s: float = 0.0  # the last change of weights: merge and write
    layers: int = 0  # layers the active adapters change


@dataclass
class LoraAdapters:
    """Loaded adapters, the active ones with their weights, and the store their merge is written to."""

    store: WeightStore
    source: ModelSource
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)
    stats: LoraStats = field(default_factory=LoraStats)

    @property
    def restore(self) -> Restore:
        return getattr(self.store, "restore", Restore.COPY)

    @restore.setter
    def restore(self, value: Restore | str) -> None:
        if self.adapters:
            raise LoraError("choose how weights are restored before loading adapters")
        try:
            self.store.restore = Restore(value)  # type: ignore[attr-defined]
        except ValueError:
            raise LoraError(f"restore must be one of {', '.join(r.value for r in Restore)}") from None

    def load(
        self,
        path_or_id: str | Path,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        *,
        local_files_only: bool = False,
    ) -> str:
        """Read a LoRA and make it the active adapter (weight 1), as diffusers' load_lora_weights does."""
        name = adapter_name or f"default_{len(self.adapters)}"
        if name in self.adapters:
            raise LoraError(
                f"adapter {name!r} is already loaded; choose another adapter_name or delete it first"
            )
        start = time.perf_counter()
        file = resolve_lora(path_or_id, weight_name, local_files_only=local_files_only)
        self.adapters[name] = Adapter(name, file, read_factors(file, self.source, self.store))
        self.stats.load_s = time.perf_counter() - start
        self._switch({name: 1.0})
        logger.info("LoRA %s (%s) loaded in %.2f s", name, file.name, self.stats.load_s)
        return name

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Sequence[float | None] | None = None,
    ) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, Mapping):
            raise LoraError("per-component adapter weights are not supported; give one weight per adapter")
        weights = (
            list(adapter_weights)
            if isinstance(adapter_weights, Sequence) and not isinstance(adapter_weights, str)
            else [adapter_weights] * len(names)
        )
        if len(weights) != len(names):
            raise LoraError(f"got {len(weights)} adapter weights for {len(names)} adapters")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise LoraError(
                f"no adapter {', '.join(map(repr, unknown))}; loaded: {', '.join(self.adapters) or 'none'}"
            )
        self._switch(
            {
                n: 1.0 if w is None else check_scale(w, f"weight of adapter {n}")
                for n, w in zip(names, weights, strict=True)
            }
        )

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise LoraError(
                f"no adapter {', '.join(map(repr, unknown))}; loaded: {', '.join(self.adapters) or 'none'}"
            )
        self._switch({n: w for n, w in self.active.items() if n not in names})
        gone = set().union(*(self.adapters.pop(n).keys for n in names))
        self.store.release(gone - set().union(set(), *(a.keys for a in self.adapters.values())))

    def unload(self) -> None:
        self.delete_adapters(list(self.adapters))

    def get_active_adapters(self) -> list[str]:
        return list(self.active)

    def describe(self) -> list[dict[str, Any]]:
        """The active adapters for metadata: name, file, sha256 prefix, weight."""
        return [
            {
                "name": n,
                "file": self.adapters[n].file.name,
                "sha256": self.adapters[n].file.sha256[:HASH_PREFIX],
                "scale": w,
            }
            for n, w in self.active.items()
        ]

    def _terms(self, active: Mapping[str, float]) -> dict[str, list[Term]]:
        terms: dict[str, list[Term]] = {}
        for name, weight in active.items():
            for factor in self.adapters[name].factors:
                terms.setdefault(factor.site.key, []).append((factor, weight * factor.scaling))
        return terms

    def _switch(self, active: dict[str, float]) -> None:
        start = time.perf_counter()
        before, after = self._terms(self.active), self._terms(active)

        def same(a: Sequence[Term], b: Sequence[Term]) -> bool:
            return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))

        changed = {
            k: after.get(k, [])
            for k in before.keys() | after.keys()
            if not same(before.get(k, []), after.get(k, []))
        }
        self.store.write(changed)
        self.active = active
        self.stats.switch_s = time.perf_counter() - start
        self.stats.layers = len(after)
        logger.info(
            "LoRA adapters %s: %d weights rewritten in %.2f s",
            active or "none",
            len(changed),
            self.stats.switch_s,
        )


def adapters_for(backend: Backend, source: ModelSource) -> LoraAdapters:
    """The LoRA machinery of a backend: in-place weights for torch, engine refits for rtx."""
    if backend.name == "torch":
        return LoraAdapters(InPlaceWeights(backend.modules), source)  # type: ignore[attr-defined]
    if backend.name == "rtx":
        from ..engines.rtx_refit import RefitWeights

        return LoraAdapters(RefitWeights.for_backend(backend, source), source)
    raise LoraError(f"backend {backend.name} does not support LoRA")
