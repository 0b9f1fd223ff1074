"""AlignProp (Prabhudesai et al. 2023): randomized truncation. K is drawn ONCE per sample from
U{k_min..k_max} (default 1..N) and the gradient flows through that sample's last K steps. (A known
defect of public code redraws the truncation at every denoising step; we do not.)"""
from __future__ import annotations

from ..sampling import Window
from .base import Method, randint


class AlignProp(Method):
    name = "alignprop"

    def k_max(self, num_steps: int) -> int:
        return self.cfg.alignprop_k_max or num_steps  # bounds checked by config.validate

    def window(self, num_steps, batch_size, generator):
        ks = randint(self.cfg.alignprop_k_min, self.k_max(num_steps), generator, size=batch_size)
        return Window(starts=[num_steps - k for k in ks])

    def grad_calls(self, num_steps):
        # The batch runs from its earliest start, so a step's calls are its largest draw: at most k_max.
        return self.k_max(num_steps)
