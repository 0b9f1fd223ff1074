"""A method is a gradient window plus a loss. The trainer asks the method for a rollout — the
latents whose reward is the objective, with the window's graph attached — and then for the loss
of their rewards.

The method is the only source of which UNet calls carry gradient:
    window(N, B, generator)  this step's draw: which trajectory steps carry gradient;
    grad_calls(N) -> int     the most grad-carrying UNet calls one rollout can make at N inference
                             steps (the max over draws: AlignProp's K = k_max, ReFL's one call,
                             DRaFT-LV's 1 + n). The memory planner and `--recompute auto` size
                             the window from it;
    rollout(...)             opens the policy's window for this draw's calls and always closes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..memory.recompute import MemoryPolicy
from ..sampling import DDIMSchedule, EpsFn, Window, run_trajectory


@dataclass
class Rollout:
    # Latents to decode and reward. x0s[0] is the sampled image (its reward is the one logged);
    # DRaFT-LV appends its re-noised and re-denoised copies.
    x0s: list[torch.Tensor]
    window: Window
    window_size: int  # grad-carrying UNet calls made (<= grad_calls(N))


@dataclass
class SamplingChain:
    """The sampling chain a method rolls out and differentiates through: the guided model output,
    the DDIM schedule, the memory policy that runs each grad-carrying call, and eta."""

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

    def grad_calls(self, num_steps: int) -> int:
        """The most grad-carrying UNet calls one rollout makes at `num_steps` inference steps."""
        raise NotImplementedError(f"{type(self).__name__} must say how many UNet calls carry gradient")

    def rollout(self, chain: SamplingChain, x_T: torch.Tensor, generator: torch.Generator) -> Rollout:
        n = len(chain.schedule)
        window = self.window(n, x_T.shape[0], generator)
        size = window.size(n)
        with chain.policy.window(size):
            x0 = run_trajectory(chain.eps_fn, chain.schedule, x_T, window, chain.policy, chain.eta,
                                generator=generator)
        return Rollout([x0], window, size)

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
