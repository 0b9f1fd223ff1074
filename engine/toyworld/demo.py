"""The demo's pictures: before/after samples with their prompts, and the trained (proxy) and the
true (gold) reward side by side over training.

    python -m refl_engine.toyworld.demo outputs/demo

reads a training output folder whose run kept its checkpoints (`make demo` trains with
`--checkpointing_steps 10 --checkpoints_total_limit 0`) and, for the base model and every
checkpoint, generates the run's sample prompts (2 images each, fixed seeds, the run's sampler:
refl-generate's `combined_generate` with no base steps) and scores them with `toyworld_proxy`
and `toyworld_gold`. Writes into the folder:
    before_after.png    the base model's and the last checkpoint's first image of each prompt,
                        the prompt above each column, proxy and gold under each image;
    proxy_vs_gold.png   mean proxy and gold (+- s.e.) per checkpoint, side by side;
    proxy_vs_gold.json  the numbers.
Over-optimization shows as the proxy still rising where gold has stopped or fallen.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import torch

IMAGES_PER_PROMPT = 2


def _score(rewards, images, prompts) -> dict:
    out = {}
    with torch.no_grad():
        for name, reward in rewards.items():
            v = reward(images, prompts).double()
            out[name] = float(v.mean())
            out[name + "_se"] = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
            out[name + "_each"] = v.tolist()
    return out


def evaluate_run(run: Path) -> tuple[list[dict], dict]:
    """(points: step, proxy, gold per checkpoint, base first; the first and last images)."""
    from ..checkpoint import list_checkpoints
    from ..config import TrainConfig
    from ..data import load_prompts, sample_prompts
    from ..generate import CombinedModel, combined_generate, load_combined
    from ..models.load import load_pipeline_components
    from ..rewards.base import build_reward

    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    prompts = sample_prompts(cfg.data, load_prompts(cfg.data.prompts))
    batch = [p for p in prompts for _ in range(IMAGES_PER_PROMPT)]
    seeds = list(range(len(batch)))
    n, g = cfg.method.num_inference_steps, cfg.method.guidance_scale
    rewards = {"proxy": build_reward("toyworld_proxy"), "gold": build_reward("toyworld_gold")}
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints:
        raise SystemExit(f"error: {run} has no checkpoints; train with --checkpointing_steps N "
                         "--checkpoints_total_limit 0 (as `make demo` does)")
    c = load_pipeline_components(cfg.model.model)
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False).eval()
    models = [(0, CombinedModel(c, base_unet=c.unet, source="base"))]
    models += [(int(p.name.split("-")[-1]), p) for p in checkpoints]
    points, images = [], {}
    for step, model in models:
        if isinstance(model, Path):
            model = load_combined(str(model), cfg.model.model)
        x = combined_generate(model, batch, seeds, 0, n, guidance_scale=g, resolution=cfg.model.resolution)
        points.append(dict(step=step, **_score(rewards, x, batch)))
        images[step] = x
        print(f"step {step:4d}: proxy {points[-1]['proxy']:.3f}  gold {points[-1]['gold']:.3f}", flush=True)
    first, last = points[0]["step"], points[-1]["step"]
    return points, dict(prompts=batch, before=images[first], after=images[last], first=first, last=last)


def plot_curves(points: list[dict], path: Path) -> Path:
    from ..viz import _atomic_savefig, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [p["step"] for p in points]
    for ax, key, title, color in ((axes[0], "proxy", "toyworld_proxy (trained on)", "tab:blue"),
                                  (axes[1], "gold", "toyworld_gold (the truth)", "tab:orange")):
        ax.errorbar(steps, [p[key] for p in points], yerr=[p[key + "_se"] for p in points], fmt="o-", capsize=3,
                    color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward on the sample prompts (+- s.e.)")
    fig.suptitle("DRaFT K=full on the learned proxy: what it optimizes vs what was wanted", fontsize=10)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def plot_before_after(shown: dict, points: list[dict], path: Path) -> Path:
    """Two rows (before, after), one column per prompt (its first image); the prompt above each column."""
    from ..viz import _atomic_savefig, _pyplot

    plt = _pyplot()
    keep = list(range(0, len(shown["prompts"]), IMAGES_PER_PROMPT))
    before, after = shown["before"][keep], shown["after"][keep]
    prompts = [shown["prompts"][i] for i in keep]
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 4.3), squeeze=False)
    scores = (points[0], points[-1])
    for row, (images, label, sc) in enumerate(((before, f"step {shown['first']}", scores[0]),
                                               (after, f"step {shown['last']}", scores[1]))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(textwrap.fill(prompts[i], 16), fontsize=6)
            ax.set_xlabel(f"proxy {sc['proxy_each'][keep[i]]:.2f}\ngold {sc['gold_each'][keep[i]]:.2f}", fontsize=6)
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"before / after: mean proxy {scores[0]['proxy']:.2f} -> {scores[1]['proxy']:.2f}, "
                 f"mean gold {scores[0]['gold']:.2f} -> {scores[1]['gold']:.2f}", fontsize=9)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refl_engine.toyworld.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training output folder with checkpoints")
    a = p.parse_args(argv)
    if not (a.run / "config.json").is_file():
        print(f"error: {a.run} is not a training output folder (no config.json)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    points, shown = evaluate_run(a.run)
    (a.run / "proxy_vs_gold.json").write_text(json.dumps(
        [{k: v for k, v in pt.items() if not k.endswith("_each")} for pt in points], indent=2))
    print(f"wrote {plot_curves(points, a.run / 'proxy_vs_gold.png')}")
    print(f"wrote {plot_before_after(shown, points, a.run / 'before_after.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
