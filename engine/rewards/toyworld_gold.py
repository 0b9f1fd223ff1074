"""`toyworld_gold`: a preference with a known truth, in closed form on the toy world's scene.

    gold(scene) = warmth(object color) + centredness(object cell)

warmth(c) = R - B of the color's sRGB value in the world's palette (orange 0.89, yellow 0.84,
red 0.76 ... blue -0.76); centredness of the 3x3 position grid cell = 1 - (|row - 1| + |col - 1|) / 2
(center 1, the middle of a side 0.5, a corner 0). Real images take both from the world's ground
truth (`gold_of_scene`). Generated images have no ground truth: the toy world's classifier
(engine/toyworld/classifier.py) reads them, and gold is the expectation of the same formula under
its color and cell probabilities,

    gold(image) = sum_c p(color = c | image) warmth(c) + sum_k p(cell = k | image) centredness(k),

which is differentiable in the pixels (so `--reward toyworld_gold` can be trained on too) and
equals gold(scene) when the classifier is certain and right.
"""
from __future__ import annotations

import torch

from ..toyworld import world
from .base import Reward, register_reward

W_WARMTH = 1.0
W_CENTER = 1.0


def warmth(color: str) -> float:
    r, _, b = world.COLORS[color]
    return r - b


def centredness(row: int, col: int) -> float:
    return 1.0 - (abs(row - 1) + abs(col - 1)) / 2


def gold_of_scene(scene: world.Scene) -> float:
    """The gold preference of a rendered scene, from its ground truth."""
    return W_WARMTH * warmth(scene.color) + W_CENTER * centredness(scene.row, scene.col)


def gold_of_probabilities(color_probs: torch.Tensor, cell_probs: torch.Tensor) -> torch.Tensor:
    """(B, len(COLORS)) color and (B, 9) row-major cell probabilities -> (B,) expected gold."""
    w = torch.tensor([warmth(c) for c in world.COLORS], dtype=color_probs.dtype, device=color_probs.device)
    k = torch.tensor([centredness(r, c) for r in range(3) for c in range(3)], dtype=cell_probs.dtype,
                     device=cell_probs.device)
    return W_WARMTH * color_probs @ w + W_CENTER * cell_probs @ k


class ToyworldGold(Reward):
    """The gold preference of generated images, read by the toy world's classifier (differentiable)."""

    name = "toyworld_gold"
    backbone = {"kind": "none"}
    # warmth spans [-0.76, 0.89] over the palette, centredness [0, 1]
    bounds = (W_WARMTH * min(warmth(c) for c in world.COLORS),
              W_WARMTH * max(warmth(c) for c in world.COLORS) + W_CENTER)

    def __init__(self, output: str = "raw"):
        super().__init__(output)
        from ..toyworld.classifier import load_classifier

        self.classifier = load_classifier()

    def score(self, images, prompts):
        p = self.classifier.probs(images.to(torch.promote_types(images.dtype, torch.float32)))
        return gold_of_probabilities(p["color"], p["cell"])


def _factory(path=None, output="raw"):
    if path:
        raise ValueError(f"reward 'toyworld_gold' reads the shipped toy-world classifier and takes no path "
                         f"(got {path!r})")
    return ToyworldGold(output)


register_reward("toyworld_gold", "the toy world's gold preference (warm, centred object), read by its classifier")(
    _factory)
