"""The torch backend's CUDA graphs, and the recapture of a new size's step with cuDNN's attention.

One `denoise.StepGraph` per step shape (table schedulers) and one `denoise.CudaGraphCall` per own-step loop
(other schedulers), all in one memory pool: they are replayed in turn, never at once.

With `fresh_attention` ("flash"; attention.py), the call that meets a new shape captures its step with that
kernel, which needs no per-shape set-up, and hands graph_upgrade.py's thread a copy of the step's buffers: the
thread runs the step once with cuDNN's attention (building its plans there, off the call) and captures it into
the same pool. The next call at that shape replays cuDNN's graph. Own-step loops keep cuDNN from the start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..denoise import CAPTURE_LOCK, CudaGraphCall, DenoiseState, StepGraph, graph_key
from ..families.base import Tensors
from .attention import use_backend
from .graph_upgrade import GraphUpgrader

logger = logging.getLogger(__name__)


class GraphSet:
    """Captured graphs by shape, their pool, and the cuDNN recaptures still under way."""

    def __init__(self, device: torch.device, fresh_attention: str | None = None) -> None:
        self.device = device
        self.fresh_attention = fresh_attention
        self.upgrader = GraphUpgrader() if fresh_attention else None
        self.steps: dict[tuple[Any, ...], StepGraph] = {}
        self.calls: dict[str, CudaGraphCall] = {}
        self.captures: dict[str, float] = {}  # step shape -> seconds its capture cost the call
        self.upgrades: dict[str, float] = {}  # step shape -> seconds of its cuDNN recapture (in the thread)
        self._pool: Any = None

    def pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def denoise(
        self,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
    ) -> DenoiseState:
        """Replay the step's graph for `state`'s shapes, capturing it first if this shape is new."""
        key = graph_key(state)
        self.take_upgrades()
        graph = self.steps.get(key)
        if graph is not None:
            return graph.run(state, on_step)
        if self.upgrader is not None:  # the call's values for the recapture, before its first step
            copy, ready = state.clone(), torch.cuda.Event()
            ready.record()
        with use_backend(self.fresh_attention):
            graph, result = StepGraph.first_run(state, make_step, on_step, pool=self.pool())
        self.steps[key] = graph
        shape = str(tuple(state.history.shape))
        self.captures[shape] = graph.capture_s
        logger.info("captured the denoising step in %.2f s (its first step included)", graph.capture_s)
        if self.upgrader is not None:
            pool = self.pool()
            self.upgrader.submit(
                key, lambda wanted: StepGraph.capture(copy, make_step, ready=ready, pool=pool, wanted=wanted)
            )
        return result

    def graphed(self, name: str, fn: Callable[[Tensors], Tensors]) -> CudaGraphCall:
        if name not in self.calls:
            self.calls[name] = CudaGraphCall(fn, self.device, pool=self.pool())
        return self.calls[name]

    def take_upgrades(self) -> int:
        """Serve the graphs the upgrade thread finished from now on; returns how many."""
        if self.upgrader is None:
            return 0
        taken = 0
        for key, graph in self.upgrader.take().items():
            if key in self.steps:
                self.steps[key] = graph
                shape = str(tuple(graph.state.history.shape))
                self.upgrades[shape] = graph.capture_s
                taken += 1
                logger.info("the %s step's cuDNN-attention graph serves from now on", shape)
        return taken

    def clear(self) -> None:
        """Drop every graph (what they ran changed); recaptures under way are dropped too."""
        with CAPTURE_LOCK:  # no recapture is mid-capture into the pool that goes
            if self.upgrader is not None:
                self.upgrader.invalidate()
            self.steps.clear()
            self.calls.clear()
            # the pool goes with them: capturing into its handle again trips the allocator's assert
            # (use_count > 0, torch 2.11), so the next capture takes a fresh pool
            self._pool = None

    @property
    def busy(self) -> bool:
        return self.upgrader is not None and self.upgrader.busy

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the recaptures under way and serve them; returns whether none is left."""
        if self.upgrader is None:
            return True
        done = self.upgrader.wait(timeout)
        self.take_upgrades()
        return done

    def close(self) -> None:
        if self.upgrader is not None:
            self.upgrader.close()
