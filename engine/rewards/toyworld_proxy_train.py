"""Train the `toyworld_proxy` reward: a Bradley-Terry fit of the small CNN to a limited set of
labelled pairs of world images, the labels drawn by a simulated rater from the gold preference.

    python -m refl_engine.rewards.toyworld_proxy_train [--out FILE] [--pairs 384] [--seed 0]

writes the shipped weights (engine/rewards/weights/toyworld_proxy.safetensors by default) with
the training record in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .toyworld_proxy import WEIGHTS, ProxyNet

PAIRS = 384  # labelled pairs the proxy is trained on
RATER_TEMPERATURE = 0.15  # the simulated rater's noise, in gold units
# World seeds of the labelled pairs: apart from the ranges the pipeline, the classifier and the tests
# render, so the proxy's data are its own; held-out pairs another 1e6 on.
SEED_BASE = 40_000_000
HELDOUT_OFFSET = 1_000_000


def labelled_pairs(n_pairs: int, seed: int, temperature: float = RATER_TEMPERATURE):
    """n_pairs pairs of world images (a, b), their gold preferences and a rater's label
    (1 = a preferred), drawn with P(a > b) = sigmoid((gold(a) - gold(b)) / temperature)."""
    from ..toyworld import world
    from .toyworld_gold import gold_of_scene

    images, _, scenes = world.generate(2 * n_pairs, seed=SEED_BASE + seed)
    gold = torch.tensor([gold_of_scene(s) for s in scenes], dtype=torch.float32)
    a, b = images[0::2], images[1::2]
    ga, gb = gold[0::2], gold[1::2]
    g = torch.Generator().manual_seed(seed + 1)
    label = (torch.rand(n_pairs, generator=g) < torch.sigmoid((ga - gb) / temperature)).float()
    return a, b, ga, gb, label


def agreement(score_a: torch.Tensor, score_b: torch.Tensor, gold_a: torch.Tensor, gold_b: torch.Tensor) -> float:
    """Share of pairs the scores order as the gold preference does (ties in gold left out)."""
    keep = (gold_a - gold_b).abs() > 1e-6
    return float(((score_a - score_b).sign() == (gold_a - gold_b).sign())[keep].float().mean())


def train_proxy(pairs: int = PAIRS, seed: int = 0, steps: int = 300, batch: int = 128, lr: float = 3e-3,
                weight_decay: float = 1e-2, width: int = 16, heldout_pairs: int = 1000) -> tuple[ProxyNet, dict]:
    """Bradley-Terry training on `pairs` labelled pairs (minibatches of `batch` pairs); returns
    the net and its record."""
    torch.manual_seed(seed)
    net = ProxyNet(width)
    a, b, ga, gb, label = labelled_pairs(pairs, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        i = torch.randint(pairs, (min(batch, pairs),), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(a[i]) - net(b[i]), label[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ha, hb, hga, hgb, _ = labelled_pairs(heldout_pairs, seed + HELDOUT_OFFSET)
        sa, sb = net(ha), net(hb)
        train_agree = agreement(net(a), net(b), ga, gb)
        scores = torch.cat([sa, sb])
    record = dict(pairs=pairs, seed=seed, steps=steps, lr=lr, weight_decay=weight_decay, width=width,
                  rater_temperature=RATER_TEMPERATURE, final_loss=float(loss.detach()),
                  train_agreement=train_agree, heldout_pairs=heldout_pairs,
                  heldout_agreement=agreement(sa, sb, hga, hgb),
                  # the observed range of the score on real images: rescaled output maps it to [0, 1]
                  bounds=[float(scores.quantile(0.01)), float(scores.quantile(0.99))])
    return net, record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refl_engine.rewards.toyworld_proxy_train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS, help="safetensors file to write")
    p.add_argument("--pairs", type=int, default=PAIRS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    net, record = train_proxy(a.pairs, a.seed, a.steps)
    from safetensors.torch import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(a.out),
              metadata={"refl_engine": json.dumps(record)})
    print(json.dumps(record, indent=2))
    print(f"wrote {a.out} ({sum(v.numel() for v in net.state_dict().values())} parameters)")
    return 0 if math.isfinite(record["final_loss"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
