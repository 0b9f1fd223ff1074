"""Built-in differentiable rewards that need no download.

They exist so the engine can be run and tested anywhere; they change images visibly, which makes
the demo's before/after grids readable.
"""
from __future__ import annotations

import torch

from .base import Reward, register_reward

_EPS = 1e-6


def _at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Colorfulness(Reward):
    """Hasler & Suesstrunk (2003) colorfulness on [0, 1] RGB, differentiable.

    rg = R - G, yb = (R + G) / 2 - B; M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2).
    The square roots get a small epsilon so a grey image still has a finite gradient.
    """

    name = "colorfulness"
    # Pure saturated primaries reach about 1.1; grey is 0.
    bounds = (0.0, 1.1)
    backbone = {"kind": "none"}

    def score(self, images, prompts):
        x = _at_least_fp32(images)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + _EPS)
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + _EPS)
        return std + 0.3 * mean


class Brightness(Reward):
    """Mean luma (Rec. 601) of the image, in [0, 1]."""

    name = "brightness"
    bounds = (0.0, 1.0)
    backbone = {"kind": "none"}

    def score(self, images, prompts):
        x = _at_least_fp32(images)
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return luma.flatten(1).mean(dim=1)


class Contrast(Reward):
    """RMS contrast: the standard deviation of luma, in [0, 0.5]."""

    name = "contrast"
    bounds = (0.0, 0.5)
    backbone = {"kind": "none"}

    def score(self, images, prompts):
        x = _at_least_fp32(images)
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return torch.sqrt(luma.flatten(1).var(dim=1, unbiased=False) + _EPS)


def _no_path(cls):
    def factory(path=None, output="raw"):
        if path:
            raise ValueError(f"reward {cls.name!r} is built in and takes no path (got {path!r})")
        return cls(output=output)

    return factory


register_reward("colorfulness", "Hasler-Suesstrunk colorfulness (built in)")(_no_path(Colorfulness))
register_reward("brightness", "mean luma (built in)")(_no_path(Brightness))
register_reward("contrast", "RMS contrast of luma (built in)")(_no_path(Contrast))
