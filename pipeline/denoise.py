"""The denoising loop: static device buffers and one pure step, replayed K times.

State lives in one buffer `history = [x0, e_0, ..., e_{K-1}]` (float32, on the device). Step k reads the
step index from a device tensor, forms the model input from the schedule's coefficient row k (see
schedule.py), runs the denoiser, applies guidance and writes e_k into the history. Nothing in a step reads a
value back to the host or branches on data, so a backend may capture `step` in a CUDA graph and replay it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .families import Family
from .families.base import Tensors
from .schedule import Schedule


@dataclass
class DenoiseState:
    """The static buffers of one denoising run. Shapes are fixed for the run; values change per step."""

    history: torch.Tensor  # (K+1, *latent_shape) float32: x0 then each guided model output
    in_coef: torch.Tensor  # (K, K+1) float32
    out_coef: torch.Tensor  # (K+1,) float32
    timesteps: torch.Tensor  # (K,) in the denoiser's timestep dtype
    cond: Tensors  # static denoiser inputs (text embeddings, ids, guidance embedding input)
    guidance: torch.Tensor  # () float32: classifier-free guidance scale (used where the family guides)
    guidance_rescale: torch.Tensor  # () float32: diffusers' guidance_rescale (0: none)
    index: torch.Tensor  # () int64: the step being run

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
    ) -> DenoiseState:
        device = x0.device
        k = schedule.num_evaluations
        history = torch.zeros((k + 1, *x0.shape), device=device, dtype=torch.float32)
        history[0] = x0
        return cls(
            history=history,
            in_coef=schedule.in_coef.to(device=device, dtype=torch.float32),
            out_coef=schedule.out_coef.to(device=device, dtype=torch.float32),
            timesteps=family.timestep_values(schedule.timesteps, dtype).to(device),
            cond=cond,
            guidance=torch.tensor(guidance_scale, device=device, dtype=torch.float32),
            guidance_rescale=torch.tensor(guidance_rescale, device=device, dtype=torch.float32),
            index=torch.zeros((), device=device, dtype=torch.int64),
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
        )

    def load(self, other: DenoiseState) -> None:
        """Copy `other`'s values into these buffers (same shapes) and reset the step index."""
        mine, theirs = self.buffers(), other.buffers()
        for name, tensor in mine.items():
            tensor.copy_(theirs[name])
        self.index.zero_()

    @property
    def num_steps(self) -> int:
        return int(self.in_coef.shape[0])

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
        out = denoiser(**family.denoiser_inputs(x, t, state.cond))["noise_pred"]
        guided = family.guide(out, state.guidance, x.shape[0], state.guidance_rescale)
        state.history.index_copy_(0, k + 1, guided.unsqueeze(0).to(torch.float32))
        state.index.add_(1)

    return step


def final_latents(state: DenoiseState, dtype: torch.dtype) -> torch.Tensor:
    return state.latents(state.out_coef).to(dtype)
