"""A method is a window policy plus a loss (METHODS.md). The trainer asks the method for a
rollout — the latents x0 whose reward is the objective, with the window's graph attached — and
then for the loss of their rewards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..sampling import DDIMSchedule, EpsFn, Window, run_trajectory
from ..memory.recompute import MemoryPolicy


@dataclass
class Rollout:
    x0s: list[torch.Tensor]  # latents to decode and reward (DRaFT-LV: one per inner loop)
    window: Window
    window_size: int  # grad-carrying UNet calls made


@dataclass
class Sampler:
    """What a method needs to roll out: the guided noise prediction, the schedule, the policy."""

    eps_fn: EpsFn
    schedule: DDIMSchedule
    policy: MemoryPolicy
    eta: float = 0.0


#: A regularizer maps the trainer's step context to a scalar loss term (added to the loss).
Regularizer = Callable[[dict], torch.Tensor]


class Method:
    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg  # the MethodConfig
        self.regularizers: dict[str, tuple[float, Regularizer]] = {}

    def window(self, num_steps: int, batch_size: int, generator: torch.Generator) -> Window:
        raise NotImplementedError

    def rollout(self, sampler: Sampler, x_T: torch.Tensor, generator: torch.Generator) -> Rollout:
        n = len(sampler.schedule)
        window = self.window(n, x_T.shape[0], generator)
        x0 = run_trajectory(sampler.eps_fn, sampler.schedule, x_T, window, sampler.policy, sampler.eta,
                            generator=generator)
        return Rollout([x0], window, window.size(n))

    def loss(self, rewards: list[torch.Tensor]) -> torch.Tensor:
        """-scale * mean reward (averaged over the rollout's latents)."""
        return -self.cfg.reward_scale * torch.stack([r.mean() for r in rewards]).mean()

    def add_regularizer(self, name: str, weight: float, fn: Regularizer) -> None:
        self.regularizers[name] = (weight, fn)

    def regularize(self, context: dict) -> dict[str, torch.Tensor]:
        return {name: weight * fn(context) for name, (weight, fn) in self.regularizers.items()}


def randint(low: int, high: int, generator: torch.Generator, size: int = 1) -> list[int]:
    """Uniform integers in [low, high] inclusive from a torch generator (reproducible, resumable)."""
    return torch.randint(low, high + 1, (size,), generator=generator).tolist()
