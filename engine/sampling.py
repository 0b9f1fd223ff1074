"""DDIM step math, classifier-free guidance, x0_hat, and the trajectory runner with a gradient window.

The runner is the one loop all methods share (METHODS.md, "One loop for all of them"): steps
before the window run under torch.no_grad() and build no graph; steps inside it carry gradient
and go through the memory policy (engine/memory/recompute.py), which decides what each UNet call
keeps for backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .memory.recompute import FullRecompute, MemoryPolicy


# ---------------------------------------------------------------- the schedule

@dataclass
class DDIMSchedule:
    """N inference timesteps (high noise to low) and the cumulative alphas DDIM needs."""

    timesteps: torch.Tensor  # (N,) long, t_N > ... > t_1
    alphas_cumprod: torch.Tensor  # (T,) float64
    final_alpha_cumprod: float
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int) -> "DDIMSchedule":
        """Take timesteps and alphas from a diffusers DDIMScheduler (its spacing, offset and
        final-alpha conventions), so the math below agrees with `scheduler.step`."""
        scheduler.set_timesteps(num_inference_steps)
        return cls(
            timesteps=scheduler.timesteps.clone().long(),
            alphas_cumprod=scheduler.alphas_cumprod.double().clone(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            num_train_timesteps=scheduler.config.num_train_timesteps,
        )

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> float:
        return float(self.alphas_cumprod[int(self.timesteps[i])])

    def alpha_prev(self, i: int) -> float:
        # diffusers: prev_t = t - T // N, or the final alpha past the start of the schedule.
        prev_t = int(self.timesteps[i]) - self.num_train_timesteps // len(self)
        return float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod


def x0_hat(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The predicted clean latent: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return (x - (1.0 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev);
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z.
    """
    x0 = x0_hat(x, eps, alpha_bar)
    sigma = 0.0
    if eta > 0:
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
    x_prev = alpha_bar_prev**0.5 * x0 + (1.0 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs the noise z")
        x_prev = x_prev + sigma * noise
    return x_prev


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------- the window

@dataclass
class Window:
    """Which steps carry gradient.

    starts: per sample, the first step index (0 = t_N, the noisiest) whose UNet call carries
        gradient; N means "no step". DRaFT-K: N - K for every sample; AlignProp: drawn per sample.
    stop: ReFL only: the step index at which to stop and return x0_hat of that step's prediction.
    """

    starts: list[int]
    stop: int | None = None

    def first(self) -> int:
        return min(self.starts)

    def last(self, num_steps: int) -> int:
        return self.stop if self.stop is not None else num_steps - 1

    def size(self, num_steps: int) -> int:
        """The number of grad-carrying UNet calls the runner makes."""
        return max(0, self.last(num_steps) - self.first() + 1)


# ---------------------------------------------------------------- the runner

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> guided eps


def run_trajectory(eps_fn: EpsFn, schedule: DDIMSchedule, x: torch.Tensor, window: Window,
                   policy: MemoryPolicy | None = None, eta: float = 0.0,
                   noises: Sequence[torch.Tensor] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Run x_T down the schedule; return x0 (with the graph of the window steps attached).

    eps_fn(x, t) is the (guided) noise prediction. With eta > 0, the per-step noise comes from
    `noises[i]` when given, else from `generator`. Sample b's steps before `window.starts[b]`
    carry no gradient; steps before the window's first step run under no_grad entirely.
    """
    policy = policy or FullRecompute()
    n = len(schedule)
    if len(window.starts) != x.shape[0]:
        raise ValueError(f"window has {len(window.starts)} starts for a batch of {x.shape[0]}")
    starts = torch.tensor(window.starts, device=x.device)
    first, last = window.first(), window.last(n)
    if hasattr(policy, "begin_window"):
        policy.begin_window(window.size(n))
    window_pos = 0
    for i in range(n):
        t = schedule.timesteps[i].to(x.device)
        a, a_prev = schedule.alpha(i), schedule.alpha_prev(i)
        noise = None
        if eta > 0:
            noise = noises[i] if noises is not None else torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if i < first or i > last:
            with torch.no_grad():
                x = ddim_step(x, eps_fn(x, t), a, a_prev, eta, noise)
            continue
        eps = policy.unet_call(eps_fn, x, t, window_pos=window_pos)
        window_pos += 1
        if i == window.stop:
            return x0_hat(x, eps, a)
        x_next = ddim_step(x, eps, a, a_prev, eta, noise)
        inactive = (starts > i).view(-1, *([1] * (x.dim() - 1)))
        # Samples whose own window has not begun keep the value but drop the graph.
        x = torch.where(inactive, x_next.detach(), x_next) if bool(inactive.any()) else x_next
    if hasattr(policy, "end_window"):
        policy.end_window()
    return x


def renoise_and_denoise(eps_fn: EpsFn, schedule: DDIMSchedule, x0: torch.Tensor, noise: torch.Tensor,
                        policy: MemoryPolicy | None = None, window_pos: int = 0) -> torch.Tensor:
    """DRaFT-LV's inner step: x1 = sqrt(a1) stop_grad(x0) + sqrt(1 - a1) noise at the last
    (least noisy) schedule step, then one grad-carrying DDIM step back to x0."""
    policy = policy or FullRecompute()
    i = len(schedule) - 1
    a, a_prev = schedule.alpha(i), schedule.alpha_prev(i)
    x1 = a**0.5 * x0.detach() + (1 - a) ** 0.5 * noise
    t = schedule.timesteps[i].to(x0.device)
    eps = policy.unet_call(eps_fn, x1, t, window_pos=window_pos)
    return ddim_step(x1, eps, a, a_prev)
