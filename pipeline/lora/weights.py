"""What a LoRA changes (sites, factors) and the torch backend's weights, updated in place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch
from torch import nn

from ..engines.fusion import FUSED_PROJECTIONS
from ..errors import LoraError

# Attributes through which a compile layer may wrap a block (ours, torch.compile's OptimizedModule).
_WRAPPERS = ("block", "_orig_mod", "module")


class Restore(StrEnum):
    """How a weight gets back to W0 when the adapters on it change (figures in docs/lora.md)."""

    COPY = "copy"  # keep W0 of each touched weight on the host: exact; costs their size in host memory
    SUBTRACT = "subtract"  # keep nothing: W0 = W - applied deltas (float32), as diffusers' unfuse_lora;
    # in bf16 a switch moves ~4% of the touched weights by one bf16 step


@dataclass(frozen=True)
class Site:
    """Where one LoRA'd layer lives among a backend's weights."""

    key: str  # the backend's name of the weight
    shape: tuple[int, ...]  # the layer's weight shape, torch layout (out, in[, kh, kw])
    device: torch.device
    dtype: torch.dtype
    rows: tuple[int, int] | None = None  # a fused projection (to_qkv): the layer's rows of the weight


@dataclass(eq=False)
class Factor:
    """One layer's LoRA: its delta is scaling * (up @ down), added at `site`."""

    site: Site
    down: torch.Tensor  # A: (r, in[, kh, kw])
    up: torch.Tensor  # B: (out, r[, 1, 1])
    scaling: float  # alpha / r

    def delta(self) -> torch.Tensor:
        """up @ down in float32, the layer's weight shape (for convolutions as peft's Conv2d computes it)."""
        up, down = self.up.float(), self.down.float()
        if down.dim() == 2:
            return up @ down
        if down.shape[2:] == (1, 1):
            return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        return nn.functional.conv2d(down.transpose(0, 1), up).transpose(0, 1)


Term = tuple[Factor, float]  # a factor and the scale it is applied with (adapter weight * scaling)


def merged_delta(terms: Sequence[Term], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The sum of `terms` over a whole weight of `shape`, float32 on `device` (rows for fused weights)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for factor, scale in terms:
        rows = factor.site.rows
        target = out if rows is None else out[rows[0] : rows[1]]
        target.add_(factor.delta(), alpha=scale)
    return out


class WeightStore(Protocol):
    """A backend's weights as LoRA sees them."""

    def locate(self, component: str, layer: str) -> Site | None:
        """The site of `layer` (a PEFT name inside `component`), None if there is no such Linear/Conv2d."""
        ...

    def has_module(self, component: str, name: str) -> bool: ...

    def write(self, updates: Mapping[str, Sequence[Term]]) -> None:
        """Set each weight to W0 + its terms (W0 itself for no terms)."""
        ...

    def release(self, keys: Iterable[str]) -> None:
        """Forget what is kept to restore `keys` (they are at W0 and no adapter touches them)."""
        ...


def _child(module: nn.Module, name: str) -> nn.Module | None:
    """A direct child by name, looking through compile wrappers."""
    while True:
        child = module._modules.get(name)
        if child is not None:
            return child
        inner = next((module._modules[w] for w in _WRAPPERS if module._modules.get(w) is not None), None)
        if inner is None:
            return None
        module = inner


def submodule(root: nn.Module, dotted: str) -> nn.Module | None:
    """`root.get_submodule(dotted)`, looking through the wrappers a compile layer may add around blocks."""
    module: nn.Module | None = root
    for part in dotted.split(".") if dotted else ():
        module = _child(module, part) if module is not None else None
    return module


class InPlaceWeights:
    """The torch backend's weights: LoRA deltas merged into the parameters themselves."""

    def __init__(self, modules: Mapping[str, nn.Module], restore: Restore = Restore.COPY) -> None:
        self.modules = modules
        self.restore = Restore(restore)
        self._params: dict[str, torch.Tensor] = {}
        self._base: dict[str, torch.Tensor] = {}  # Restore.COPY: W0 on the host
        self._applied: dict[str, list[Term]] = {}  # what each weight holds beyond W0

    @property
    def kept_bytes(self) -> int:
        """Host memory held by W0 copies."""
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def has_module(self, component: str, name: str) -> bool:
        root = self.modules.get(component)
        return root is not None and submodule(root, name) is not None

    def locate(self, component: str, layer: str) -> Site | None:
        root = self.modules.get(component)
        if root is None:
            return None
        parent_name, _, leaf = layer.rpartition(".")
        parent = submodule(root, parent_name)
        if parent is None:
            return None
        if getattr(parent, "fused_projections", False):
            for fused_name, parts in FUSED_PROJECTIONS.items():
                fused = _child(parent, fused_name)
                if leaf in parts and isinstance(fused, nn.Linear):
                    sizes = [getattr(_child(parent, p), "out_features", 0) for p in parts]
                    if sum(sizes) != fused.out_features:
                        sizes = [fused.out_features // len(parts)] * len(parts)
                    start = sum(sizes[: parts.index(leaf)])
                    rows = (start, start + sizes[parts.index(leaf)])
                    key = f"{component}:{parent_name}.{fused_name}.weight"
                    return self._site(key, fused.weight, (rows[1] - rows[0], fused.in_features), rows)
        module = _child(parent, leaf)
        if module is None:
            return None
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise LoraError(
                f"{component}.{layer} is a {type(module).__name__}, not a Linear or Conv2d layer LoRA can merge "
                "into"
                + (
                    " (LoRA on --precision fp8 is not supported: use bf16)"
                    if "Fp8" in type(module).__name__
                    else ""
                )
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise LoraError(f"{component}.{layer} is a grouped convolution; LoRA on it is not supported")
        weight = module.weight
        return self._site(f"{component}:{layer}.weight", weight, tuple(weight.shape), None)

    def _site(
        self, key: str, weight: torch.Tensor, shape: tuple[int, ...], rows: tuple[int, int] | None
    ) -> Site:
        self._params[key] = weight
        return Site(key, shape, weight.device, weight.dtype, rows)

    @torch.no_grad()
    def write(self, updates: Mapping[str, Sequence[Term]]) -> None:
        for key, terms in updates.items():
            param = self._params[key]
            if self.restore is Restore.COPY:
                if key not in self._base:  # first touch: the weight is W0
                    base = torch.empty(param.shape, dtype=param.dtype, pin_memory=param.is_cuda)
                    self._base[key] = base.copy_(param)
                w0 = self._base[key].to(param.device, non_blocking=True).float()
            else:
                w0 = param.float() - merged_delta(self._applied.get(key, ()), param.shape, param.device)
            param.copy_(w0 + merged_delta(terms, param.shape, param.device))
            self._applied[key] = list(terms)
        if any(p.is_cuda for p in self._params.values()):
            torch.cuda.current_stream().synchronize()  # pinned W0 copies stay valid; switch times are honest

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._base.pop(key, None)
            self._applied.pop(key, None)
            self._params.pop(key, None)
