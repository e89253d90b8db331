"""Platform keys: what compiled code depends on, exactly where it must match, and nothing more.

The key is exact for: the backend, the GPU model (SKU, by name) and its compute capability (or the CPU
architecture and vector ISA), CUDA major.minor, and the compiler and library versions (TensorRT-RTX; or
Python, torch and triton). It leaves out the NVIDIA driver:

- rtx: TensorRT-RTX's runtime cache is usable on the same GPU and TensorRT-RTX version with a driver at least
  as new as the one that made it. The driver goes into the cache file's header and the shipped manifest, and
  `driver_problem` compares it (`>=`, not `==`), so a shipped cache fits every newer driver build.
- torch: Inductor's artifacts are Triton cubins built by the ptxas that ships with triton, plus Python code;
  neither changes with the driver build, and a driver that runs this torch build runs them (torch's own
  compile caches leave the driver out of their keys too).

Nothing in the key depends on optional modules (pynvml): the driver, read through NVML where installed, is
only recorded.
"""

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


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def driver_problem(made_with: str | None, here: str | None) -> str | None:
    """Why a TensorRT-RTX runtime cache made under driver `made_with` cannot be used under driver `here`
    (None when it can: same or newer driver, or either one unknown, where TensorRT-RTX itself decides)."""
    if not made_with or not here:
        return None
    if _version_tuple(here) < _version_tuple(made_with):
        return f"made with NVIDIA driver {made_with}, this machine has the older {here}; update the driver"
    return None


def tool_versions(backend: str) -> dict[str, str]:
    """The versions whose change invalidates what `backend` compiled (absent tools are left out).

    rtx: TensorRT-RTX only (its runtime cache is native code, whatever Python runs it); torch: Python (the
    generated code and pickled graphs), torch and triton."""
    if backend == "rtx":
        versions = {"tensorrt_rtx": _dist_version("tensorrt_rtx")}
    else:
        import torch

        versions = {
            "python": ".".join(platform.python_version_tuple()[:2]),
            "torch": torch.__version__,
            "triton": _dist_version("triton") or _dist_version("pytorch-triton"),
        }
    return {k: v for k, v in versions.items() if v}


def _cuda_major_minor(version: str | None) -> str | None:
    parts = re.findall(r"\d+", version or "")
    return ".".join(parts[:2]) if parts else None


@dataclass(frozen=True)
class PlatformInfo:
    """What a compiled artifact depends on: backend, device, CUDA and tool versions (the key), and the driver
    (recorded, compared by `driver_problem`, never part of the key)."""

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
            cuda_version=_cuda_major_minor(torch.version.cuda),
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
