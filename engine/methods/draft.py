"""DRaFT (Clark et al. 2023): gradient through the last K steps (K = N: the whole trajectory),
and DRaFT-LV: K = 1 with n re-noised inner loops for a lower-variance gradient."""
from __future__ import annotations

import torch

from ..config import parse_K
from ..sampling import Window, renoise_and_denoise, run_trajectory
from .base import Method, Rollout


class DRaFT(Method):
    name = "draft"

    def window(self, num_steps, batch_size, generator):
        k = parse_K(self.cfg.K, num_steps)
        return Window(starts=[num_steps - k] * batch_size)


class DRaFTLV(Method):
    """Sample x0 without gradient, then n times: re-noise stop_grad(x0) to the least-noisy
    schedule step and denoise that one step with gradient. The loss averages the n rewards."""

    name = "draft-lv"

    def window(self, num_steps, batch_size, generator):
        return Window(starts=[num_steps] * batch_size)  # the trajectory itself carries no gradient

    def rollout(self, sampler, x_T, generator, noises=None):
        n = len(sampler.schedule)
        window = self.window(n, x_T.shape[0], generator)
        x0 = run_trajectory(sampler.eps_fn, sampler.schedule, x_T, window, sampler.policy, sampler.eta,
                            generator=generator)
        x0s = []
        for j in range(self.cfg.lv_inner):
            noise = noises[j] if noises is not None else torch.randn(
                x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x0s.append(renoise_and_denoise(sampler.eps_fn, sampler.schedule, x0, noise, sampler.policy,
                                           window_pos=j))
        return Rollout(x0s, window, self.cfg.lv_inner)
