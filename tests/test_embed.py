"""The toy world's contrastive embedding (engine/toyworld/embed.py) as refl-evaluate's diversity and
Frechet backbone (`--eval_embedding toyworld`): identical images have diversity 0, two real sets
are close, a different world distribution is far."""
import dataclasses

import numpy as np
import pytest
import torch

from refl_engine.evaluate import build_embedder, dino_diversity, set_distances
from refl_engine.toyworld import world
from refl_engine.toyworld.embed import EMBED_DIM, augment, nt_xent, view_pairs

SEED = 46_000_000  # world seeds apart from the encoder's training ones (0) and every other user's


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("toyworld")


def render(scenes):
    return world.images(scenes)


def test_identical_images_have_zero_diversity(embedder):
    images, _, _ = world.generate(3, SEED)
    e = embedder(images[:1].repeat(8, 1, 1, 1))  # 2 prompts x 4 copies of one image
    assert e.shape == (8, EMBED_DIM)
    assert abs(dino_diversity(e.view(2, 4, -1))) < 1e-12
    # different images are not: the metric sees the encoder's distinctions
    assert dino_diversity(embedder(images).view(1, 3, -1)) > 0.05


def test_frechet_small_between_real_sets_larger_for_another_distribution(embedder):
    n = 320  # > EMBED_DIM, so both covariances have full rank
    a, _, _ = world.generate(n, SEED + 1)
    b, _, _ = world.generate(n, SEED + 2)
    rng = np.random.default_rng(SEED + 3)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    # the same kinds of scenes with every object moved to the center cell, or made a circle
    half = world.RESOLUTION / 2
    centred = render([dataclasses.replace(s, cx=half, cy=half) for s in scenes])
    circles = render([dataclasses.replace(s, shape="circle") for s in scenes])
    ea, eb = embedder(a), embedder(b)
    real = set_distances(ea, eb)["frechet_distance"]
    to_centred = set_distances(ea, embedder(centred))["frechet_distance"]
    to_circles = set_distances(ea, embedder(circles))["frechet_distance"]
    assert real >= 0
    # measured on the shipped weights (512 images a set): real 0.16, circles 0.69 (4.4x), centred 2.29
    # (14x); a same-distribution pair differs by sampling noise only, which the margins stand above
    assert to_circles > 2.5 * real, (real, to_circles)
    assert to_centred > 4 * real, (real, to_centred)


def test_training_views_and_loss():
    v1, v2 = view_pairs(4, seed=0)
    assert v1.shape == v2.shape == (4, 3, world.RESOLUTION, world.RESOLUTION) and not torch.equal(v1, v2)
    g = torch.Generator().manual_seed(0)
    x = augment(v1, g)
    assert x.min() >= 0 and x.max() <= 1
    # NT-Xent: matched pairs of distinct embeddings score near 0, random ones near log(2B - 1)
    z = torch.nn.functional.one_hot(torch.arange(4), 8).float() * 10
    assert float(nt_xent(z, z, 0.1)) < 1e-3
    r = torch.randn(256, 16, generator=g)
    assert float(nt_xent(r[:128], r[128:], 1e3)) == pytest.approx(np.log(255), rel=1e-3)
