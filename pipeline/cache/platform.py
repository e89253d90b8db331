"""Platform keys: everything compiled code depends on (backend, device, driver, CUDA, tool versions)."""

from __future__ import annotations

import hashlib
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver release (e.g. 560.35.03), from NVML where installed, else /proc on Linux."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, or no driver: fall back
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else None


def tool_versions(backend: str) -> dict[str, str]:
    """The versions whose change invalidates what `backend` compiled (absent tools are left out)."""
    import torch

    versions: dict[str, str | None] = {"python": ".".join(platform.python_version_tuple()[:2])}
    if backend == "rtx":
        versions["tensorrt_rtx"] = _dist_version("tensorrt_rtx")
    else:
        versions["torch"] = torch.__version__
        versions["triton"] = _dist_version("triton") or _dist_version("pytorch-triton")
    return {k: v for k, v in versions.items() if v}


@dataclass(frozen=True)
class PlatformInfo:
    """What a compiled artifact depends on: backend, device, driver, CUDA and tool versions."""

    backend: str
    device_type: str
    device_name: str
    compute_capability: str | None = None
    cpu_arch: str | None = None
    cpu_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Filesystem-safe, stable: the same platform gives the same key in every process."""
        parts = [self.backend, self.device_name]
        if self.compute_capability:
            parts.append("sm" + self.compute_capability.replace(".", ""))
        if self.cpu_arch:
            parts.append(self.cpu_arch)
        if self.cpu_capability:
            parts.append(self.cpu_capability)
        if self.driver_version:
            parts.append("drv" + self.driver_version)
        if self.cuda_version:
            parts.append("cuda" + self.cuda_version)
        parts += [f"{_TOOL_ABBREV.get(name, name)}{version}" for name, version in sorted(self.tools.items())]
        key = "-".join(_slug(p) for p in parts)
        if len(key) > 150:  # keep well under file name limits, still unique
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            key = f"{key[:137]}-{digest}"
        return key

    def fields(self) -> dict[str, Any]:
        """Human-readable fields, for manifests and --cache-info."""
        return {"key": self.key, **asdict(self)}


_TOOL_ABBREV = {"python": "py", "tensorrt_rtx": "trtrtx"}


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.]", "_", text.strip())).strip("_.").lower() or "none"


def platform_info(backend: str, device: torch.device | str) -> PlatformInfo:
    """Describe this machine for `backend` on `device` (a GPU by name and compute capability, or the CPU)."""
    import torch

    device = torch.device(device)
    tools = tool_versions(backend)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return PlatformInfo(
            backend=backend,
            device_type="cuda",
            device_name=torch.cuda.get_device_name(index),
            compute_capability=f"{major}.{minor}",
            driver_version=_driver_version(),
            cuda_version=torch.version.cuda,
            tools=tools,
        )
    if device.type == "cpu":
        return PlatformInfo(
            backend=backend,
            device_type="cpu",
            device_name="cpu",
            cpu_arch=platform.machine() or "unknown",
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            tools=tools,
        )
    return PlatformInfo(backend=backend, device_type=device.type, device_name=device.type, tools=tools)


def platform_key(backend: str, device: torch.device | str) -> str:
    """`platform_info(backend, device).key`."""
    return platform_info(backend, device).key
