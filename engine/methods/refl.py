"""ReFL (Xu et al. 2023): run no-grad to a stop step drawn uniformly from a late range, make ONE
grad-carrying UNet call there and take its x0_hat directly."""
from __future__ import annotations

from ..config import parse_stop_range
from ..sampling import Window
from .base import Method, randint


class ReFL(Method):
    name = "refl"

    def window(self, num_steps, batch_size, generator):
        lo, hi = parse_stop_range(self.cfg.stop_range, num_steps)
        stop = randint(lo, hi, generator)[0]
        return Window(starts=[stop] * batch_size, stop=stop)

    def grad_calls(self, num_steps):
        return 1  # the stop step's call; the steps after it are never run
