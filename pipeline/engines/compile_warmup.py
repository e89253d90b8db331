"""The compiler's one-time start-up, paid while the model loads instead of inside the first call.

A process's first compile pays for more than its own code: importing Inductor and Triton, starting
Inductor's pool of compile workers (one process per core, each importing torch), Triton's first kernel
build and load, cuBLAS's handle. Measured on the H200 (FLUX.1-dev 1024², torch 2.11, scripts/bench.py,
2026-12-01): the double block compiled in 5.0 s in a process that had compiled before, 15.0 s in one that
had not, and 12–20 s in a new process.

`CompilerWarmup` does that start-up in a background thread: one tiny compile on the device (a layer norm,
a GEMM, a softmax: a reduction, a cuBLAS call and a pointwise kernel), started before the weights load and
joined before the first call. Only when a compile is coming (the compile cache holds no region artifact for
this model), and only on CUDA: on a CPU the tiny compile is itself a C++ build that competes with the load
for the same cores.

The thread compiles a function of its own; dynamo's frame hook is per thread, so nothing the loading thread
runs is traced.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

logger = logging.getLogger(__name__)


def _warmup_kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    return torch.softmax(torch.nn.functional.gelu(h @ w).float(), dim=-1).to(x.dtype)


def warm_compiler(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Compile and run one tiny function on `device`; returns the seconds it took."""
    start = time.perf_counter()
    try:  # start the compile workers first: they come up while the rest of this runs
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception as e:  # a private API that moved costs the head start, nothing else
        logger.debug("could not start Inductor's compile workers early: %s", e)
    fn = torch.compile(_warmup_kernel, fullgraph=True, dynamic=False)
    x = torch.randn(16, 256, device=device, dtype=dtype)
    w = torch.randn(256, 256, device=device, dtype=dtype)
    with torch.inference_mode():
        fn(x, w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class CompilerWarmup:
    """`warm_compiler` in a daemon thread; `join()` waits for it and never raises."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = device
        self.dtype = dtype
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="compiler-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.device.type == "cuda" and self.device.index is not None:
                torch.cuda.set_device(self.device.index)  # the current device is per thread
            self.seconds = warm_compiler(self.device, self.dtype)
        except Exception as e:  # the first real compile then pays the start-up, as it would have anyway
            self.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]

    def join(self) -> float | None:
        """Wait for the warm-up; returns its seconds (None if it failed, with the reason logged)."""
        waited = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - waited
        if self.error is not None:
            logger.info("compiler warm-up failed (%s); the first compile pays the start-up", self.error)
        else:
            logger.info(
                "compiler warmed up in %.1f s while the model loaded (%.1f s of it waited for)",
                self.seconds,
                waited,
            )
        return self.seconds
