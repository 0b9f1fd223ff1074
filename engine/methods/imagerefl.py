"""ImageReFL (Sorokin et al. 2025): ReFL on real images.

A real image-caption pair is encoded to x0_real and noised to the hand-over step t' (the step at
which combined generation hands over from the base to the fine-tuned model):
x_t' = sqrt(ab(t')) x0_real + sqrt(1 - ab(t')) eps. The fine-tuned model runs from t' to a stop
step drawn from the late range without gradient, and ONE grad-carrying call there gives x0_hat,
whose reward is the loss, as in ReFL. The model thus learns to raise the reward of images whose
layout it did not make, so it has no reason to change the early steps that set the layout.

Two regularizers against over-fitting the reward: the diffusion loss
||target - out_theta(x_t', t', c)||^2 on the same noised real latent (weight
--diffusion_loss_weight, 1e-5 by default: the official 0.01 times the 1e-3 loss scale), and
every --refl_every-th optimizer step a classic ReFL step from pure noise (3 ImageReFL : 1 ReFL).

The trainer calls `prepare_batch(trainer, prompts)` before each rollout: on ImageReFL steps it
draws the real batch, whose captions replace the prompts.
"""
from __future__ import annotations

import torch

from ..config import handover_index, parse_stop_range
from ..regularizers import diffusion_loss, encode_images
from ..sampling import Window
from .base import Rollout, randint
from .refl import ReFL


class ImageReFL(ReFL):
    name = "imagerefl"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.x0_real: torch.Tensor | None = None  # this step's real latents; None on a ReFL step
        self.cond_fn = None  # the conditional (unguided) model output for the diffusion loss
        self.add_regularizer("diffusion_loss", cfg.diffusion_loss_weight, lambda ctx: ctx["rollout"].diffusion_loss)

    def is_refl_step(self, step: int) -> bool:
        """Optimizer step `step` (0-based) is a classic ReFL one: every refl_every-th step."""
        every = self.cfg.refl_every
        return every > 0 and (step + 1) % every == 0

    def prepare_batch(self, trainer, prompts: list[str]) -> list[str]:
        if self.is_refl_step(trainer.step):
            self.x0_real = None
            return prompts
        from ..models.conditioning import make_eps_fn

        images, captions = trainer.dataset.sample(len(prompts), trainer.generator)
        self.x0_real = encode_images(trainer.components.vae, images, trainer.generator).to(trainer.device)
        self.cond_fn = make_eps_fn(trainer.unet, trainer.text.conditioning(captions, cfg=False), 1.0)
        return captions

    def set_real_batch(self, x0_real: torch.Tensor, cond_fn) -> None:
        """The real latents and conditional model of the next rollout (tests, other trainers)."""
        self.x0_real, self.cond_fn = x0_real, cond_fn

    def handover(self, num_steps: int) -> int:
        return handover_index(self.cfg.handover_step, num_steps)

    def window(self, num_steps, batch_size, generator):
        if self.x0_real is None:
            return super().window(num_steps, batch_size, generator)
        lo, hi = parse_stop_range(self.cfg.stop_range, num_steps)
        stop = randint(max(lo, self.handover(num_steps)), hi, generator)[0]
        return Window(starts=[stop] * batch_size, stop=stop)

    def grad_calls(self, num_steps):
        return 1 + (self.cfg.diffusion_loss_weight > 0)  # the stop step's call, the diffusion loss's

    def rollout(self, chain, x_T, generator):
        if self.x0_real is None:  # a classic ReFL step from pure noise
            rollout = super().rollout(chain, x_T, generator)
            rollout.diffusion_loss = torch.zeros((), device=x_T.device)
            return rollout
        s, n = chain.schedule, len(chain.schedule)
        x0_real, eps = self.x0_real.to(x_T.dtype), x_T  # x_T ~ N(0, I) is the noise that makes x_t'
        if x0_real.shape != x_T.shape:
            raise ValueError(f"real latents {tuple(x0_real.shape)} do not match the noise {tuple(x_T.shape)}; "
                             "images must be encoded at the training resolution")
        h = self.handover(n)
        window = self.window(n, x_T.shape[0], generator)
        with_diffusion = self.cfg.diffusion_loss_weight > 0
        size = window.size(n) + with_diffusion
        a = s.alpha(h)
        x = a**0.5 * x0_real + (1 - a) ** 0.5 * eps
        t_h = s.timesteps[h].to(x.device)
        with chain.policy.window(size):
            loss_diffusion = torch.zeros((), device=x.device)
            if with_diffusion:
                policy_fn = lambda x_t, t: chain.policy.unet_call(self.cond_fn, x_t, t)  # noqa: E731
                loss_diffusion = diffusion_loss(policy_fn, x0_real, eps, t_h, a, s.prediction_type)
            with torch.no_grad():
                for i in range(h, window.stop):
                    t = s.timesteps[i].to(x.device)
                    noise = None
                    if chain.eta > 0:
                        from ..sampling import randn

                        noise = randn(x.shape, generator, x.device, x.dtype)
                    x = s.step(i, x, chain.eps_fn(x, t), chain.eta, noise)
            out = chain.policy.unet_call(chain.eps_fn, x, s.timesteps[window.stop].to(x.device))
            x0 = s.x0_hat(window.stop, x, out)
        rollout = Rollout([x0], window, size)
        rollout.diffusion_loss = loss_diffusion
        rollout.handover = h
        return rollout

