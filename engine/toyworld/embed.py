"""A toy image embedding for the toy world: what DINOv2 is to photographs, for diversity and
Frechet distance without a download (`--eval_embedding toyworld`).

A small CNN (three 3x3 conv stages, 32 -> 16 -> 8 -> 4 pixels, then a linear map of the 4x4 grid
to EMBED_DIM numbers, so the embedding keeps where things are) trained self-supervised with the
SimCLR loss (NT-Xent, Chen et al. 2020) on the procedural world: the two views of an image are
two renders of the same scene with the object moved by up to a pixel and resized by up to 10%,
each with a random color gain, blur and pixel noise. So the embedding is invariant to what a
sampler blurs or jitters and separates what a scene is made of: the object's color, shape,
position and size and the background.

    python -m refl_engine.toyworld.embed --out engine/toyworld/embed.safetensors

trains it (seeded, a few minutes on one CPU thread) and writes the shipped weights, with the
settings and the final loss in the file's metadata.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world

WEIGHTS = Path(__file__).resolve().parent / "embed.safetensors"
EMBED_DIM = 64


class ToyEncoder(nn.Module):
    """(B, 3, 32, 32) in [0, 1] (other sizes are resized) -> (B, EMBED_DIM)."""

    def __init__(self, width: int = 16, dim: int = EMBED_DIM):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
        )
        self.proj = nn.Linear(2 * w * 16, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * 2 - 1
        if x.shape[-2:] != (world.RESOLUTION, world.RESOLUTION):
            x = F.interpolate(x, size=(world.RESOLUTION,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.proj(self.features(x).flatten(1))


class ToyworldEmbedder:
    """The shipped encoder as an `evaluate` embedding backbone: images -> (B, EMBED_DIM)."""

    name = "toyworld"

    def __init__(self, path: str | Path | None = None, device="cpu"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path else WEIGHTS
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("refl_engine", "{}"))
        self.model = ToyEncoder(int(meta.get("width", 16)), int(meta.get("dim", EMBED_DIM)))
        self.model.load_state_dict(load_file(str(path)))
        self.model.requires_grad_(False).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()


# ---------------------------------------------------------------- training

def _jittered(scene: world.Scene, rng: np.random.Generator) -> world.Scene:
    """The same scene, the object moved by up to a pixel and resized by up to 10%."""
    return dataclasses.replace(scene, cx=scene.cx + float(rng.uniform(-1, 1)), cy=scene.cy + float(rng.uniform(-1, 1)),
                               radius=scene.radius * float(rng.uniform(0.9, 1.1)))


def view_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two renders of each of n scenes: (n, 3, 32, 32) twice."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    views = [np.stack([world.render(_jittered(s, rng)) for s in scenes]) for _ in range(2)]
    return tuple(torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for v in views)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Color gain, a random blur (a sampler's softness) and pixel noise."""
    b = x.shape[0]
    x = x * (1 + 0.08 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1))
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=g)
    x = (1 - mix) * x + mix * blurred
    return (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2B - 1 other views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def train_embedder(seed: int = 0, pool: int = 4096, steps: int = 400, batch: int = 128, lr: float = 3e-3,
                   temperature: float = 0.2, width: int = 16, dim: int = EMBED_DIM) -> tuple[ToyEncoder, dict]:
    torch.manual_seed(seed)
    t0 = time.time()
    v1, v2 = view_pairs(pool, seed)
    net = ToyEncoder(width, dim)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay: the last steps settle the embedding
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        i = torch.randint(pool, (batch,), generator=g)
        loss = nt_xent(net(augment(v1[i], g)), net(augment(v2[i], g)), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    record = dict(seed=seed, pool=pool, steps=steps, batch=batch, lr=lr, temperature=temperature, width=width, dim=dim,
                  first_loss=float(np.mean(losses[:10])), final_loss=float(np.mean(losses[-20:])),
                  chance_loss=float(np.log(2 * batch - 1)), seconds=round(time.time() - t0, 1))
    return net, record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refl_engine.toyworld.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS, help="safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    net, record = train_embedder(a.seed, steps=a.steps)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(a.out),
              metadata={"refl_engine": json.dumps(record)})
    print(json.dumps(record, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
