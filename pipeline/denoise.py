"""The denoising loop, two ways (schedule.py decides which).

Tables (linear schedulers): state lives in one buffer `history = [x0, e_0, ..., e_{K-1}]` (float32, on the
device). Step k reads the step index from a device tensor, forms the model input from the schedule's
coefficient row k, runs the denoiser, applies guidance and writes e_k into the history. Nothing in a step
reads a value back to the host or branches on data, so a backend may capture the whole `step` in a CUDA graph
and replay it (`Backend.denoise`; `StepGraph` below).

The scheduler's own step (every other scheduler): the loop of diffusers' pipeline (`scheduler_loop`), where
only the denoiser call plus guidance is a pure function of named tensors, which a backend may capture in a
CUDA graph per shape (`Backend.graphed`, `CudaGraphCall`); the scheduler's update runs outside the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .families import Family
from .families.base import Tensors
from .schedule import Schedule, SchedulerSteps

if TYPE_CHECKING:
    from .engines.base import Backend

logger = logging.getLogger(__name__)
Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class DenoiseState:
    """The static buffers of one denoising run. Shapes are fixed for the run; values change per step.

    The schedule's buffers may hold more steps than the run takes (capacity C >= K, zero-padded): the padded
    coefficients are zero and the padded history rows are never written, so the result is the same, and one
    CUDA graph captured for C serves every step count up to C (`step_capacity`)."""

    history: torch.Tensor  # (C+1, *latent_shape) float32: x0 then each guided model output
    in_coef: torch.Tensor  # (C, C+1) float32
    out_coef: torch.Tensor  # (C+1,) float32
    timesteps: torch.Tensor  # (C,) in the denoiser's timestep dtype
    cond: Tensors  # static denoiser inputs (text embeddings, ids, guidance embedding input)
    guidance: torch.Tensor  # () float32: classifier-free guidance scale (used where the family guides)
    guidance_rescale: torch.Tensor  # () float32: diffusers' guidance_rescale (0: none)
    index: torch.Tensor  # () int64: the step being run
    steps: int  # K, the steps this run takes (<= C)

    @classmethod
    def create(
        cls,
        family: Family,
        schedule: Schedule,
        x0: torch.Tensor,
        cond: Tensors,
        guidance_scale: float,
        dtype: torch.dtype,
        guidance_rescale: float = 0.0,
        capacity: int | None = None,
    ) -> DenoiseState:
        """The run's buffers, its schedule zero-padded to `capacity` steps (default: exactly its own)."""
        device = x0.device
        k = schedule.num_evaluations
        c = max(k, capacity or k)
        history = torch.zeros((c + 1, *x0.shape), device=device, dtype=torch.float32)
        history[0] = x0
        in_coef = torch.zeros((c, c + 1), device=device, dtype=torch.float32)
        in_coef[:k, : k + 1] = schedule.in_coef
        out_coef = torch.zeros((c + 1,), device=device, dtype=torch.float32)
        out_coef[: k + 1] = schedule.out_coef
        values = family.timestep_values(schedule.timesteps, dtype).to(device)
        timesteps = torch.zeros((c,), device=device, dtype=values.dtype)
        timesteps[:k] = values
        return cls(
            history=history,
            in_coef=in_coef,
            out_coef=out_coef,
            timesteps=timesteps,
            cond=cond,
            guidance=torch.tensor(guidance_scale, device=device, dtype=torch.float32),
            guidance_rescale=torch.tensor(guidance_rescale, device=device, dtype=torch.float32),
            index=torch.zeros((), device=device, dtype=torch.int64),
            steps=k,
        )

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every tensor a step reads or writes, by name: what a captured graph depends on."""
        fixed = {
            "history": self.history,
            "in_coef": self.in_coef,
            "out_coef": self.out_coef,
            "timesteps": self.timesteps,
            "guidance": self.guidance,
            "guidance_rescale": self.guidance_rescale,
            "index": self.index,
        }
        return fixed | {f"cond.{name}": t for name, t in sorted(self.cond.items())}

    def clone(self) -> DenoiseState:
        """Buffers of the same shapes (for a graph's static state), with the step index at 0."""
        return DenoiseState(
            history=self.history.clone(),
            in_coef=self.in_coef.clone(),
            out_coef=self.out_coef.clone(),
            timesteps=self.timesteps.clone(),
            cond={name: t.clone() for name, t in self.cond.items()},
            guidance=self.guidance.clone(),
            guidance_rescale=self.guidance_rescale.clone(),
            index=torch.zeros_like(self.index),
            steps=self.steps,
        )

    def load(self, other: DenoiseState) -> None:
        """Copy `other`'s values into these buffers (same shapes) and its step count; reset the step index."""
        mine, theirs = self.buffers(), other.buffers()
        for name, tensor in mine.items():
            tensor.copy_(theirs[name])
        self.index.zero_()
        self.steps = other.steps

    @property
    def num_steps(self) -> int:
        """The steps this run takes (its buffers may hold more)."""
        return self.steps

    def latents(self, coef: torch.Tensor) -> torch.Tensor:
        """coef . history, over the history axis."""
        return torch.tensordot(coef, self.history, dims=1)


def make_step(
    family: Family, denoiser: Callable[..., Tensors], state: DenoiseState, dtype: torch.dtype
) -> Callable[[], None]:
    """One denoising step over `state`'s buffers; advances `state.index`."""

    def step() -> None:
        k = state.index
        x = state.latents(state.in_coef.index_select(0, k)[0]).to(dtype)
        t = state.timesteps.index_select(0, k)
        guided = guided_output(family, denoiser, x, t, state.cond, state.guidance, state.guidance_rescale)
        state.history.index_copy_(0, k + 1, guided.unsqueeze(0).to(torch.float32))
        state.index.add_(1)

    return step


def final_latents(state: DenoiseState, dtype: torch.dtype) -> torch.Tensor:
    return state.latents(state.out_coef).to(dtype)


def guided_output(
    family: Family,
    denoiser: Callable[..., Tensors],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Tensors,
    guidance: torch.Tensor,
    guidance_rescale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model output the scheduler sees: the denoiser at (x, t), then the family's guidance (and
    diffusers' guidance_rescale where given)."""
    out = denoiser(**family.denoiser_inputs(x, t, cond))["noise_pred"]
    return family.guide(out, guidance, x.shape[0], guidance_rescale)


def denoise_with_tables(
    backend: Backend,
    family: Family,
    schedule: Schedule,
    x0: torch.Tensor,
    cond: Tensors,
    guidance_scale: float,
    dtype: torch.dtype,
    on_step: Callable[[], None],
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Final latents of a linear scheduler's run: its tables over static buffers, one step replayed K times."""
    capacity = backend.step_capacity(schedule.num_evaluations, x0.numel() * 4)  # float32 history rows
    state = DenoiseState.create(family, schedule, x0, cond, guidance_scale, dtype, guidance_rescale, capacity)
    denoiser = backend.engines[family.denoiser]
    state = backend.denoise(state, lambda s: make_step(family, denoiser, s, dtype), on_step)
    return final_latents(state, dtype)


# ---- the scheduler's own step -----------------------------------------------------------------------------
def scheduler_loop(
    plan: SchedulerSteps,
    x0: torch.Tensor,
    model: Callable[[torch.Tensor, int], torch.Tensor],
    generator: Generators,
    on_step: Callable[[], None],
) -> torch.Tensor:
    """The loop of diffusers' StableDiffusionPipeline / FluxPipeline: `model(model_input, k)` is the guided
    denoiser at evaluation k; the scheduler scales its input and takes its own step, drawing any noise from
    `generator` after the initial noise, as diffusers does."""
    sched = plan.scheduler
    extra = plan.step_kwargs(generator)
    latents = x0 * getattr(sched, "init_noise_sigma", 1.0)  # FluxPipeline does not scale: FlowMatch has none
    for k, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        latents = sched.step(model(x, k), t, latents, return_dict=False, **extra)[0]
        on_step()
    return latents


def guided_denoiser(
    family: Family, denoiser: Callable[..., Tensors], dtype: torch.dtype
) -> Callable[[Tensors], Tensors]:
    """The scheduler loop's denoiser call as a function of named tensors (what a CUDA graph captures):
    {"sample", "timestep", "guidance_scale", "guidance_rescale", "cond.<input>"...} -> {"noise_pred": the guided
    output}."""

    def call(inputs: Tensors) -> Tensors:
        cond = {name[5:]: t for name, t in inputs.items() if name.startswith("cond.")}
        x = inputs["sample"].to(dtype)
        return {
            "noise_pred": guided_output(
                family,
                denoiser,
                x,
                inputs["timestep"],
                cond,
                inputs["guidance_scale"],
                inputs["guidance_rescale"],
            )
        }

    return call


def denoise_with_scheduler(
    backend: Backend,
    family: Family,
    plan: SchedulerSteps,
    x0: torch.Tensor,
    cond: Tensors,
    guidance_scale: float,
    dtype: torch.dtype,
    generator: Generators,
    on_step: Callable[[], None],
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Final latents of a run of the scheduler's own step, the denoiser call graph-captured by the backend."""
    denoiser = backend.engines[family.denoiser]
    call = backend.graphed("guided_denoiser", guided_denoiser(family, denoiser, dtype))
    timesteps = family.timestep_values(plan.scheduler.timesteps, dtype).to(x0.device)
    fixed = {f"cond.{name}": t for name, t in cond.items()}
    fixed["guidance_scale"] = torch.tensor(guidance_scale, device=x0.device, dtype=torch.float32)
    fixed["guidance_rescale"] = torch.tensor(guidance_rescale, device=x0.device, dtype=torch.float32)

    def model(x: torch.Tensor, k: int) -> torch.Tensor:
        return call({"sample": x, "timestep": timesteps[k], **fixed})["noise_pred"]

    return scheduler_loop(plan, x0, model, generator, on_step)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: Tensors  # static input buffers
    outputs: Tensors  # static outputs, rewritten by each replay


class CudaGraphCall:
    """`fn(inputs) -> outputs` over named tensors, captured in one CUDA graph per input shapes and dtypes.

    A call copies the inputs into the graph's static buffers, replays it and returns copies of its outputs (a
    scheduler may keep what it is given: PNDM keeps its past model outputs). The first call of a shape warms
    `fn` up on a side stream (compile, autotune, cuBLAS workspaces), then captures it. All shapes share one
    memory pool: only the inputs (allocated outside) and the copied outputs outlive a replay.
    """

    def __init__(
        self,
        fn: Callable[[Tensors], Tensors],
        device: torch.device,
        *,
        pool: Any = None,
        warmup: int = 1,
    ) -> None:
        self.fn = fn
        self.device = device
        self.warmup = warmup
        self.graphs: dict[tuple[Any, ...], _Captured] = {}
        self.capture_s: dict[str, float] = {}  # seconds per captured shape key
        self._pool = pool  # shared with the backend's other graphs

    def __call__(self, inputs: Tensors) -> Tensors:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        captured = self.graphs.get(key)
        if captured is None:  # the warm-up before the capture is this call, for real
            captured, outputs = self._capture(key, inputs)
            self.graphs[key] = captured
            return {name: t.clone() for name, t in outputs.items()}
        for name, tensor in inputs.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return {name: t.clone() for name, t in captured.outputs.items()}

    def _capture(self, key: tuple[Any, ...], inputs: Tensors) -> tuple[_Captured, Tensors]:
        """Warm `fn` up on these inputs (its outputs are this call's result), then capture it."""
        start = time.perf_counter()
        static = {name: t.clone() for name, t in inputs.items()}
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                warm = self.fn(static)
            warm = {name: t.clone() for name, t in warm.items()}  # before the graph's pool reuses them
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.fn(static)
        seconds = time.perf_counter() - start
        self.capture_s[str(key)] = seconds
        logger.info("captured the denoiser call of the scheduler loop in %.1f s", seconds)
        return _Captured(graph, static, outputs), warm


# ---- the step as one CUDA graph ---------------------------------------------------------------------------------
def graph_key(state: DenoiseState) -> tuple[object, ...]:
    """Shapes and dtypes of every buffer the step reads or writes: one captured graph per key. Values
    (noise, text embeddings, guidance scale, schedule, step count) are copied into the graph's buffers per call."""
    return tuple((name, tuple(t.shape), t.dtype) for name, t in state.buffers().items())


GRAPH_STEPS = 64  # a graphed run's schedule buffers hold at least this many steps (step_capacity)


def step_capacity(steps: int, row_bytes: int, budget_bytes: int) -> int:
    """The schedule length a graphed run's buffers hold, so that one CUDA graph per size serves many step
    counts: `GRAPH_STEPS` (every count from 1 to 64: 4, 20, 28, 30, 50...), doubled past it. The history
    holds one latent of `row_bytes` per step, so where the padded history would pass `budget_bytes` the run
    keeps its own length (a graph per step count, as before). The padded rows cost a step a dot product over
    zeros: memory-bound, microseconds."""
    capacity = GRAPH_STEPS
    while capacity < steps:
        capacity *= 2
    return capacity if (capacity + 1) * row_bytes <= budget_bytes else steps


@dataclass
class StepGraph:
    """One denoising step captured in a CUDA graph over static buffers, replayed for every step."""

    state: DenoiseState  # the graph's own buffers (a clone of the state it was captured for)
    graph: torch.cuda.CUDAGraph
    capture_s: float

    @classmethod
    def first_run(
        cls,
        state: DenoiseState,
        make_step: Callable[[DenoiseState], Callable[[], None]],
        on_step: Callable[[], None],
        *,
        pool: object | None = None,
    ) -> tuple[StepGraph, DenoiseState]:
        """The first call at `state`'s shapes: capture the step, and serve the call meanwhile.

        Step 0 runs for real on the graph's buffers, on a side stream and outside any graph: it is also the
        warm-up that lazy initialisation needs (cuBLAS handles and workspaces, cuDNN attention plans, kernels
        loaded from the compile cache), which must not be captured. Step 1 is captured (capturing runs
        nothing), then replayed for steps 1..K-1. So a new shape costs one capture, not extra steps.
        Returns the graph and the state holding the result.
        """
        start = time.perf_counter()
        device = state.history.device
        static = state.clone()  # the call's values, index 0
        step = make_step(static)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()  # step 0, for real
        current.wait_stream(side)
        on_step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            step()
        captured = cls(static, graph, time.perf_counter() - start)
        for _ in range(state.num_steps - 1):
            graph.replay()
            on_step()
        return captured, static

    def run(self, state: DenoiseState, on_step: Callable[[], None]) -> DenoiseState:
        """Copy `state`'s values in, replay the step `num_steps` times; the graph's state holds the result."""
        self.state.load(state)
        for _ in range(state.num_steps):
            self.graph.replay()
            on_step()
        return self.state
