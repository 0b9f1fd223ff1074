"""DRaFT (Clark et al. 2023): gradient through the last K steps (K = N: the whole trajectory),
and DRaFT-LV: K = 1 plus n re-noised copies of the sample for a lower-variance gradient."""
from __future__ import annotations

import torch

from ..config import parse_K
from ..sampling import Window, randn, renoise_and_denoise, run_trajectory
from .base import Method, Rollout


class DRaFT(Method):
    name = "draft"

    def __init__(self, cfg):
        super().__init__(cfg)
        # --K parsed once: None = "full" (K = N whatever N is), else the integer, checked against N.
        self.K = None if str(cfg.K).lower() == "full" else parse_K(cfg.K, cfg.num_inference_steps)

    def k(self, num_steps: int) -> int:
        if self.K is not None and self.K > num_steps:
            raise ValueError(f"K={self.K} exceeds the {num_steps} inference steps")
        return num_steps if self.K is None else self.K

    def window(self, num_steps, batch_size, generator):
        return Window(starts=[num_steps - self.k(num_steps)] * batch_size)

    def grad_calls(self, num_steps):
        return self.k(num_steps)


class DRaFTLV(Method):
    """DRaFT-LV. The sampling trajectory runs with K = 1 (its last step carries gradient) to the
    sample x0; then, n times, stop_grad(x0) is re-noised to the least noisy schedule step,
    x1 = sqrt(a_1) stop_grad(x0) + sqrt(1 - a_1) z with fresh z, and denoised by one grad-carrying
    step to x0^(j). The gradient estimate is the paper's

        g = grad r(x0) + sum_{j=1..n} grad r(x0^(j)),

    the K = 1 gradient of the sample plus the n re-noised ones, so the loss is
    -scale * (r(x0) + sum_j r(x0^(j))), each reward averaged over the batch. The logged reward is
    r(x0), the sample's. Grad-carrying UNet calls: 1 + n, all in the rollout's one window.
    """

    name = "draft-lv"

    def window(self, num_steps, batch_size, generator):
        return Window(starts=[num_steps - 1] * batch_size)  # K = 1

    def grad_calls(self, num_steps):
        return 1 + self.cfg.lv_inner

    def rollout(self, chain, x_T, generator):
        n = len(chain.schedule)
        window = self.window(n, x_T.shape[0], generator)
        size = window.size(n) + self.cfg.lv_inner
        with chain.policy.window(size):
            x0 = run_trajectory(chain.eps_fn, chain.schedule, x_T, window, chain.policy, chain.eta,
                                generator=generator)
            x0s = [x0]
            for _ in range(self.cfg.lv_inner):
                z = randn(x0.shape, generator, x0.device, x0.dtype)
                x0s.append(renoise_and_denoise(chain.eps_fn, chain.schedule, x0, z, chain.policy))
        return Rollout(x0s, window, size)

    def loss(self, rewards):
        """-scale * (r(x0) + sum_j r(x0^(j))): the sample's reward plus its n re-noised copies'."""
        return -self.cfg.reward_scale * torch.stack([r.mean() for r in rewards]).sum()
