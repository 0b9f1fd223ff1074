"""`toyworld_proxy`: a learned reward for the toy world, trained on a limited set of labelled pairs.

The gold preference (`toyworld_gold`) is known in closed form; this proxy only saw it through
a few hundred pairs of real world images, each labelled by a simulated rater who prefers image a over b
with probability sigmoid((gold(a) - gold(b)) / temperature) — noisy labels, as human
preference data are. The network is a small CNN over pixels (three 3x3 conv layers, global
average pooling, a linear read-out; ~15K parameters), so it learns what in the pixels goes with
the preference in those pairs: warm pixels, more than warm *objects*, and little of where the
object sits. Optimizing a diffusion model against it therefore drifts from the gold optimum:
the proxy keeps rising where the gold preference does not (reward over-optimization, measured by
benchmarks/fidelity.py).

    python -m refl_engine.rewards.toyworld_proxy_train

trains it (seeded, about a minute on one CPU thread) and writes the shipped weights
(weights/toyworld_proxy.safetensors); the file's metadata holds the training settings, the
held-out agreement with the gold preference and the score bounds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardFiles, RewardWeightsError, load_state_dict_file, register_reward

WEIGHTS = Path(__file__).resolve().parent / "weights" / "toyworld_proxy.safetensors"
RESOLUTION = 16  # the net reads 16x16 (the world's 32x32 images average-pooled; other sizes resized)


class ProxyNet(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B,) score."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(2 * w, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.adaptive_avg_pool2d(x, RESOLUTION)
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(-1)


class ToyworldProxy(Reward):
    """The learned proxy of the toy world's gold preference (see the module docstring)."""

    name = "toyworld_proxy"
    backbone = {"kind": "none"}

    def __init__(self, path: str | Path | None = None, output: str = "raw"):
        super().__init__(output)
        path = Path(path) if path else WEIGHTS
        if path.is_dir():
            path = path / WEIGHTS.name
        state = load_state_dict_file(path, WEIGHTS.name)
        meta = read_metadata(path)
        self.net = ProxyNet(int(meta.get("width", 16)))
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise RewardWeightsError(f"{path} is not a toyworld_proxy checkpoint ({str(e).splitlines()[0]})") from None
        if "bounds" in meta:
            self.bounds = tuple(meta["bounds"])

    def score(self, images, prompts):
        return self.net(images.to(torch.promote_types(images.dtype, torch.float32)))


def read_metadata(path: str | Path) -> dict:
    """The training record stored in the safetensors header (empty for a plain state dict)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("refl_engine", "{}"))


def _factory(path=None, output="raw"):
    return ToyworldProxy(path, output)


register_reward("toyworld_proxy", "learned proxy of the toy world's gold preference (shipped weights)",
                RewardFiles(local=(WEIGHTS.name,)))(_factory)
