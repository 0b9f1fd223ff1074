"""A small CNN that reads a toy-world image's ground truth: the shape, its color, the background
(flat color or scene), the position-grid cell, and the shape's center and size.

It is the measuring stick of caption following (does a generated "red star in the top left"
show a red star in the top left?) and the differentiable eye of the gold reward on generated
images: `probs(images)` maps images in [0, 1] to class probabilities with gradients.

    python -m refl_engine.toyworld.classifier --out engine/toyworld/classifier.safetensors

trains it (seeded, one thread, about a minute of CPU) on rendered images with blur, noise and
color jitter, so that the slightly soft images a diffusion model decodes are in its training
distribution, and writes the weights with the held-out accuracies in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

WEIGHTS = Path(__file__).resolve().parent / "classifier.safetensors"

COLOR_NAMES = tuple(world.COLORS)
# background classes: the flat colors, then the scenes
BACKGROUNDS = COLOR_NAMES + tuple(world.SCENES)
HEADS = {"shape": len(world.SHAPES), "color": len(COLOR_NAMES), "background": len(BACKGROUNDS), "cell": 9}
# Held-out world seeds (pretrain.py renders below 1e6, tests/test_toyworld.py from 1e7).
TRAIN_SEED, EVAL_SEED = 20_000_000, 30_000_000


class WorldClassifier(nn.Module):
    """Five conv layers (32 -> 4 pixels) and a linear layer over the flattened 4x4 map (flattened,
    not pooled, so the position survives), then one linear head per label and a regression of the
    shape's center (x, y in [-1, 1], image center 0) and circumradius (fraction of the side)."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU()]

        self.features = nn.Sequential(*block(3, w, 1), *block(w, w, 2), *block(w, 2 * w, 1),
                                      *block(2 * w, 2 * w, 2), *block(2 * w, 4 * w, 2))
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
        self.geometry = nn.Linear(hidden, 3)  # cx, cy, radius

    def forward(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head and the geometry regression, for images (B, 3, H, W) in [0, 1]
        (resized to 32x32 when they are another size)."""
        x = images01
        if x.shape[-2:] != (world.RESOLUTION, world.RESOLUTION):
            x = F.interpolate(x, size=(world.RESOLUTION, world.RESOLUTION), mode="bilinear", antialias=True,
                              align_corners=False)
        h = self.trunk(self.features(x * 2 - 1))
        out = {k: head(h) for k, head in self.heads.items()}
        out["geometry"] = self.geometry(h)
        return out

    def probs(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable class probabilities: shape (B, 5), color (B, 10), background (B, 17),
        cell (B, 9, row-major from the top left), row and col (B, 3, its marginals), and the
        regressed center (B, 2) in [-1, 1] and radius (B,) as a fraction of the side."""
        out = self(images01)
        p = {k: out[k].softmax(-1) for k in HEADS}
        grid = p["cell"].view(-1, 3, 3)
        p["row"], p["col"] = grid.sum(2), grid.sum(1)
        p["center"], p["radius"] = out["geometry"][:, :2], out["geometry"][:, 2]
        return p


def labels(scenes: list[world.Scene], size: int = world.RESOLUTION) -> dict[str, torch.Tensor]:
    """The ground truth of rendered scenes in the classifier's label spaces."""
    return dict(
        shape=torch.tensor([world.SHAPES.index(s.shape) for s in scenes]),
        color=torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]),
        background=torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
        cell=torch.tensor([s.cell for s in scenes]),
        row=torch.tensor([s.row for s in scenes]),
        col=torch.tensor([s.col for s in scenes]),
        geometry=torch.tensor([[2 * s.cx / size - 1, 2 * s.cy / size - 1, s.radius / size] for s in scenes]),
    )


def caption_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """What captions ask for, in the classifier's label spaces; -1 where a caption leaves a label
    free (the position, when it names none)."""
    parsed = [world.parse_caption(c) for c in captions]
    bad = [c for c, p in zip(captions, parsed) if p is None]
    if bad:
        raise ValueError(f"not a caption of the toy world: {bad[0]!r}")
    return dict(
        shape=torch.tensor([world.SHAPES.index(p["shape"]) for p in parsed]),
        color=torch.tensor([COLOR_NAMES.index(p["color"]) for p in parsed]),
        background=torch.tensor([BACKGROUNDS.index(p["background"]) for p in parsed]),
        cell=torch.tensor([-1 if p["row"] is None else 3 * p["row"] + p["col"] for p in parsed]),
        row=torch.tensor([-1 if p["row"] is None else p["row"] for p in parsed]),
        col=torch.tensor([-1 if p["col"] is None else p["col"] for p in parsed]),
    )


@torch.no_grad()
def accuracy(model: WorldClassifier, images01: torch.Tensor, target: dict[str, torch.Tensor],
             batch: int = 256) -> dict[str, float]:
    """Share of images whose most probable class is the target's, per label (labels with target
    -1 are skipped; a label with no target at all is left out)."""
    p = {}
    for i in range(0, len(images01), batch):
        for k, v in model.probs(images01[i:i + batch]).items():
            p.setdefault(k, []).append(v)
    out = {}
    for k in ("shape", "color", "background", "cell", "row", "col"):
        if k not in target:
            continue
        keep = target[k] >= 0
        if keep.any():
            pred = torch.cat(p[k]).argmax(-1)
            out[k] = float((pred[keep] == target[k][keep]).float().mean())
    return out


def chance(target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of always answering the target's most frequent class (the chance level a
    classifier must beat, for the label distribution at hand)."""
    out = {}
    for k, v in target.items():
        if k == "geometry":
            continue
        v = v[v >= 0]
        if len(v):
            out[k] = float(torch.bincount(v).max()) / len(v)
    return out


def load_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> WorldClassifier:
    """The shipped classifier (or the one at `path`), in eval mode with frozen weights; gradients
    still flow to its input."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no classifier weights; build them with "
                                f"`python -m refl_engine.toyworld.classifier --out {path}`")
    model = WorldClassifier()
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval().requires_grad_(False)


def load_metadata(path: str | Path | None = None) -> dict:
    """The training settings and held-out accuracies stored with the weights."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS), "pt") as f:
        return json.loads((f.metadata() or {}).get("refl_engine", "{}"))


# ---------------------------------------------------------------- caption following

def prompt_set(n: int = 90, seed: int = 0) -> list[world.Scene]:
    """A fixed, balanced set of positioned flat-background scenes: color i % 10, cell i % 9 and
    shape (i // 10) % 5, so any 10 consecutive prompts hold every color, 50 every (shape, color)
    pair and 90 every (color, cell) pair; background, size and exact position from `seed`. Their
    captions are the prompts and their renders the real images to compare generated ones with."""
    rng = np.random.default_rng(40_000_000 + seed)
    colors = list(world.COLORS)
    scenes = []
    for i in range(n):
        color, (row, col), shape = colors[i % 10], divmod(i % 9, 3), world.SHAPES[(i // 10) % 5]
        others = [c for c in colors if c != color]
        background = others[rng.integers(len(others))]
        radius = float(rng.uniform(*world.RADIUS_RANGE) * world.RESOLUTION)
        cx, cy = world.place(rng, row, col, radius)
        scenes.append(world.Scene(shape, color, background, cx, cy, radius, False, row, col, True))
    return scenes


@torch.no_grad()
def sample(components, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 7.5,
           batch: int = 45) -> torch.Tensor:
    """DDIM samples in [0, 1] from a loaded pipeline, through the engine's own conditioning and
    sampler (the path training takes); the initial noise of prompt i is seeded by (seed, i)."""
    from ..models.conditioning import TextEncoderCache, make_eps_fn
    from ..sampling import DDIMSchedule, Window, run_trajectory

    c = components
    schedule = DDIMSchedule.from_scheduler(c.scheduler, steps)
    text = TextEncoderCache(c, torch.device("cpu"), torch.float32)
    size, channels = c.unet.config.sample_size, c.unet.config.in_channels
    out = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        x = torch.stack([torch.randn((channels, size, size), generator=torch.Generator().manual_seed(
            seed * 1_000_003 + lo + i)) for i in range(len(chunk))])
        eps_fn = make_eps_fn(c.unet, text.conditioning(chunk, cfg=guidance > 1.0), guidance)
        x0 = run_trajectory(eps_fn, schedule, x, Window(starts=[steps] * len(chunk)))
        out.append((c.vae.decode(x0 / c.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def denoise_from(components, images01: torch.Tensor, prompts: list[str], start: float, seed: int = 0,
                 steps: int = 20, guidance: float = 3.0, batch: int = 45) -> torch.Tensor:
    """SDEdit from real images: each image encoded to its latent mean, noised to the sampling
    step `start` of the way up the schedule (0.4: step t_{0.4 N}; 1.0: t_N, which on a schedule
    with zero terminal SNR, as the embedded model's, is pure noise and gives the ordinary
    sample), then denoised with its caption by the engine's DDIM steps from there. What a label's
    accuracy loses between two starts is decided by the model between their noise levels."""
    from ..models.conditioning import TextEncoderCache, make_eps_fn
    from ..sampling import DDIMSchedule

    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1] (the fraction of the schedule to denoise), got {start}")
    c = components
    schedule = DDIMSchedule.from_scheduler(c.scheduler, steps)
    first = steps - max(1, round(start * steps))  # index of the first step run (0 = t_N, pure noise)
    a = schedule.alpha(first)
    text = TextEncoderCache(c, torch.device("cpu"), torch.float32)
    out = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        z0 = c.vae.encode(images01[lo:lo + len(chunk)] * 2 - 1).latent_dist.mean * c.vae.config.scaling_factor
        noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(
            seed * 1_000_003 + lo + i)) for i in range(len(chunk))])
        x = a ** 0.5 * z0 + (1 - a) ** 0.5 * noise
        eps_fn = make_eps_fn(c.unet, text.conditioning(chunk, cfg=guidance > 1.0), guidance)
        for i in range(first, steps):
            x = schedule.step(i, x, eps_fn(x, schedule.timesteps[i]))
        out.append((c.vae.decode(x / c.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vae, images01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images in [0, 1] through the autoencoder: encoded to the posterior mean, decoded."""
    out = []
    for i in range(0, len(images01), batch):
        z = vae.encode(images01[i:i + batch] * 2 - 1).latent_dist.mean
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def caption_following(components, model: WorldClassifier | None = None, n_prompts: int = 90, seeds=(0, 1),
                      guidances=(1.0, 7.5), steps: int = 20, starts=(), start_guidance: float = 3.0) -> dict:
    """The classifier's accuracy at reading each prompt's shape, color, background and cell: on
    the rendered scenes of `prompt_set` (real), on the same scenes through the pipeline's
    autoencoder (reconstructed: encoded to the posterior mean and decoded, the most the UNet's
    samples can show) and on the pipeline's samples for their captions (generated, per guidance
    scale, over `seeds`), with the chance level of the prompt set. With `starts`, also on the
    scenes noised part of the way up the schedule and denoised with their captions at
    `start_guidance` and with the empty caption (`denoise_from`, over `seeds`): where between
    noise and image each label is decided, and how much of it the caption decides."""
    model = model or load_classifier()
    scenes = prompt_set(n_prompts)
    prompts = [s.caption for s in scenes]
    target = caption_labels(prompts)
    real = world.images(scenes)
    out = dict(n_prompts=n_prompts, seeds=list(seeds), steps=steps, chance=chance(target),
               uniform_chance={k: 1 / n for k, n in dict(shape=5, color=10, background=17, cell=9, row=3,
                                                          col=3).items()},
               real=accuracy(model, real, target),
               reconstructed=accuracy(model, reconstruct(components.vae, real), target),
               generated={})
    for g in guidances:
        per_seed = [accuracy(model, sample(components, prompts, seed=s, steps=steps, guidance=g), target)
                    for s in seeds]
        out["generated"][str(g)] = {k: float(np.mean([a[k] for a in per_seed])) for k in per_seed[0]}
        out["generated"][str(g)]["per_seed"] = per_seed
    if starts:
        out["from_noise"] = dict(guidance=start_guidance, caption={}, empty_caption={})
    for start in starts:
        for key, texts, g in (("caption", prompts, start_guidance), ("empty_caption", [""] * len(prompts), 1.0)):
            per_seed = [accuracy(model, denoise_from(components, real, texts, start, seed=s, steps=steps, guidance=g),
                                 target) for s in seeds]
            out["from_noise"][key][str(start)] = {k: float(np.mean([a[k] for a in per_seed])) for k in per_seed[0]}
    return out


# ---------------------------------------------------------------- training

def augment(images01: torch.Tensor, gen: torch.Generator, blur_max: float = 1.2, noise_max: float = 0.05,
            jitter: float = 0.04) -> torch.Tensor:
    """Per image: a Gaussian blur of random width, a small per-channel color offset and pixel
    noise of random strength — the softness and speckle of decoded samples."""
    b = images01.shape[0]
    sigma = torch.rand(b, generator=gen) * blur_max
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 5); sigma ~0 is the identity
    x = images01.reshape(1, b * 3, *images01.shape[-2:])
    kk = k.repeat_interleave(3, 0)
    x = F.pad(x, (2, 2, 0, 0), mode="replicate")
    x = F.conv2d(x, kk.view(b * 3, 1, 1, 5), groups=b * 3)
    x = F.pad(x, (0, 0, 2, 2), mode="replicate")
    x = F.conv2d(x, kk.view(b * 3, 1, 5, 1), groups=b * 3).view_as(images01)
    x = x + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * jitter
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * noise_max
    return x.clamp(0, 1)


def render(n: int, seed: int, chunk: int = 1000) -> tuple[torch.Tensor, list[world.Scene]]:
    images, scenes = [], []
    for i in range(0, n, chunk):
        im, _, sc = world.generate(min(chunk, n - i), seed=seed + i // chunk)
        images.append(im)
        scenes += sc
    return torch.cat(images), scenes


def train(n_train: int = 16000, n_eval: int = 2000, steps: int = 1500, batch: int = 64, lr: float = 3e-3,
          seed: int = 0, threads: int = 1, log=print) -> tuple[WorldClassifier, dict]:
    torch.set_num_threads(threads)
    t0 = time.time()
    images, scenes = render(n_train, TRAIN_SEED + 1000 * seed)
    target = labels(scenes)
    t_render = time.time() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(steps):
        idx = torch.randint(n_train, (batch,), generator=gen)
        out = model(augment(images[idx], gen))
        loss = sum(F.cross_entropy(out[k], target[k][idx]) for k in HEADS)
        loss = loss + 10 * F.mse_loss(out["geometry"], target["geometry"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.eval().requires_grad_(False)
    ev_images, ev_scenes = render(n_eval, EVAL_SEED + 1000 * seed)
    ev_target = labels(ev_scenes)
    acc = accuracy(model, ev_images, ev_target)
    acc_aug = accuracy(model, augment(ev_images, torch.Generator().manual_seed(seed + 2)), ev_target)
    with torch.no_grad():
        geo = torch.cat([model(ev_images[i:i + 256])["geometry"] for i in range(0, n_eval, 256)])
    info = dict(seed=seed, n_train=n_train, n_eval=n_eval, steps=steps, batch=batch, lr=lr, threads=threads,
                render_seconds=round(t_render, 1), seconds=round(time.time() - t0, 1),
                heldout_accuracy=acc, heldout_accuracy_augmented=acc_aug, chance=chance(ev_target),
                heldout_center_mae_pixels=float((geo[:, :2] - ev_target["geometry"][:, :2]).abs().mean()
                                                * world.RESOLUTION / 2))
    return model, info


def main(argv=None) -> int:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n-train", type=int, default=16000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--measure", metavar="MODEL", nargs="?", const="", default=None,
                   help="instead of training: measure the caption following of MODEL (default: the embedded "
                        "pipeline) with the classifier at --weights, and print it as JSON")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="classifier weights for --measure")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5], help="guidance scales for --measure")
    p.add_argument("--seeds", type=int, default=2, help="sample seeds per prompt for --measure")
    p.add_argument("--from-noise", type=float, nargs="*", default=[], metavar="START",
                   help="--measure also denoises the prompt set's rendered scenes from these fractions of the "
                        "schedule (1 = pure noise, 0.4 = 40%% of the steps left) at --from-noise-guidance: the "
                        "noise levels where each label is decided (with the captions and with the empty one)")
    p.add_argument("--from-noise-guidance", type=float, default=3.0)
    a = p.parse_args(argv)
    bad = [x for x in a.from_noise if not 0.0 < x <= 1.0]
    if bad:
        p.error(f"--from-noise takes fractions of the schedule in (0, 1], got {bad}")
    torch.set_num_threads(a.threads)
    if a.measure is not None:
        from ..models.load import load_pipeline_components

        result = caption_following(load_pipeline_components(a.measure or None), load_classifier(a.weights),
                                   seeds=tuple(range(a.seeds)), guidances=tuple(a.guidance),
                                   starts=tuple(a.from_noise), start_guidance=a.from_noise_guidance)
        print(json.dumps(result, indent=2))
        return 0
    model, info = train(n_train=a.n_train, steps=a.steps, seed=a.seed, threads=a.threads)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out),
              metadata={"refl_engine": json.dumps(info)})
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
