"""The Reward interface, the reward registry and the `--reward` spec parser.

A reward maps a batch of images (float tensors in [0, 1], shape (B, 3, H, W)) and their prompts
to one score per image, differentiably with respect to the images. Rewards are frozen modules:
their parameters never receive gradient, only the image does.

`--reward` accepts
    name                 a registered reward ("colorfulness", "aesthetic", ...)
    name:path            a registered reward loaded from a local file/directory or hub id
    a=1.0,b:path=0.5     a weighted sum of the above
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


class RewardSpecError(ValueError):
    """A `--reward` string that cannot be parsed or names an unknown reward."""


class Reward(nn.Module):
    """Base class: subclasses implement `score(images, prompts) -> Tensor[B]` (raw score).

    `bounds` are the (low, high) raw-score values mapped to 0 and 1 by `rescaled` (the [0, 1]
    form ImageReFL trains on); `backbone` describes the network for the memory planner
    (a dict with at least `kind`, and the architecture config where there is one).
    """

    name: str = "reward"
    bounds: tuple[float, float] = (0.0, 1.0)
    backbone: dict | None = None
    #: The image side length the backbone reads (after preprocessing); None = any.
    input_size: int | None = None

    def __init__(self, output: str = "raw"):
        super().__init__()
        if output not in ("raw", "rescaled"):
            raise RewardSpecError(f"reward output must be 'raw' or 'rescaled', got {output!r}")
        self.output = output

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def rescale(self, raw: torch.Tensor) -> torch.Tensor:
        low, high = self.bounds
        return (raw - low) / (high - low)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        raw = self.score(images, prompts)
        return self.rescale(raw) if self.output == "rescaled" else raw

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self


class WeightedSum(Reward):
    """sum_i w_i * R_i(images, prompts); each term in its own output mode."""

    name = "weighted"

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        super().__init__()
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList([r for _, r in terms])
        lows = [w * (r.bounds[0] if w >= 0 else r.bounds[1]) for w, r in terms]
        highs = [w * (r.bounds[1] if w >= 0 else r.bounds[0]) for w, r in terms]
        self.bounds = (sum(lows), sum(highs))
        self.name = ",".join(f"{r.name}={w:g}" for w, r in terms)

    def score(self, images, prompts):
        return sum(w * r(images, prompts) for w, r in zip(self.weights, self.terms))

    def forward(self, images, prompts):
        # Terms apply their own output mode; the sum is not rescaled again.
        return self.score(images, prompts)


@dataclass
class RewardEntry:
    factory: Callable[..., Reward]  # factory(path: str | None, output: str) -> Reward
    description: str


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, description: str = ""):
    def deco(factory):
        REWARDS[name] = RewardEntry(factory, description)
        return factory

    return deco


def _ensure_builtin_rewards() -> None:
    # Importing the modules registers them; the real models are optional at import time.
    from . import toy  # noqa: F401

    for module in ("aesthetic", "hps", "pickscore", "imagereward"):
        try:
            __import__(f"{__package__}.{module}")
        except ImportError:
            pass


def parse_reward_spec(spec: str) -> list[tuple[float, str, str | None]]:
    """'a=1,b:path=0.5' -> [(1.0, 'a', None), (0.5, 'b', 'path')]."""
    if not spec or not spec.strip():
        raise RewardSpecError("empty --reward; give a name such as 'colorfulness' or 'aesthetic=1.0,hps=0.5'")
    terms = []
    for part in spec.split(","):
        part = part.strip()
        weight = 1.0
        if "=" in part:
            part, w = part.rsplit("=", 1)
            try:
                weight = float(w)
            except ValueError:
                raise RewardSpecError(f"reward weight {w!r} in --reward {spec!r} is not a number") from None
            if not math.isfinite(weight):
                raise RewardSpecError(f"reward weight {w!r} in --reward {spec!r} is not finite")
        name, _, path = part.partition(":")
        terms.append((weight, name.strip(), path.strip() or None))
    return terms


def build_reward(spec: str, output: str = "raw") -> Reward:
    """Build the (frozen) reward a `--reward` string names."""
    _ensure_builtin_rewards()
    terms = parse_reward_spec(spec)
    built = []
    for weight, name, path in terms:
        if name not in REWARDS:
            known = ", ".join(sorted(REWARDS))
            raise RewardSpecError(f"unknown reward {name!r}; choose one of: {known}")
        built.append((weight, REWARDS[name].factory(path=path, output=output).freeze()))
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedSum(built).freeze()
