"""Sample grids and the reward curve (matplotlib, headless).

A sample grid is saved twice: `<tag>.png`, small tiles captioned with prompt and reward, to look
at; and `<tag>-full.png`, the images at the resolution they were generated, side by side."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _atomic_savefig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, cols: int = 4, pad: int = 2) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, rows*H + gaps, cols*W + gaps) image, row-major, white gaps of `pad`."""
    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = images.new_ones(c, rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i]
    return grid


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as diffusers' numpy_to_pil does."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] -> a PNG at exactly that size."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    Image.fromarray(to_uint8(image)).save(tmp)
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, prompts: list[str], rewards: list[float], path: Path, title: str = "",
              cols: int = 4) -> Path:
    """A grid of images (B, 3, H, W) in [0, 1], each captioned with its prompt and reward, at `path`;
    the same images uncaptioned at full resolution at `<stem>-full.png`; a JSON file beside the
    PNG keeps the numbers."""
    save_image(image_grid(images, cols), path.with_name(f"{path.stem}-full.png"))
    plt = _pyplot()
    n = images.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        caption = prompts[i] if len(prompts[i]) <= 34 else prompts[i][:32] + "..."
        ax.set_title(f"{caption}\nreward {rewards[i]:.4f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _atomic_savefig(fig, path)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(
        {"prompts": prompts, "rewards": rewards, "mean_reward": sum(rewards) / len(rewards)}, indent=2))
    return path


def plot_reward_curve(history: list[dict], path: Path, reward_name: str, window: int = 5) -> Path | None:
    if not history:
        return None
    plt = _pyplot()
    steps = [m["step"] for m in history]
    mean = [m["reward_mean"] for m in history]
    std = [m.get("reward_std", 0.0) for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, mean, lw=1, alpha=0.5, label="batch mean")
    lo = [m - s for m, s in zip(mean, std)]
    hi = [m + s for m, s in zip(mean, std)]
    ax.fill_between(steps, lo, hi, alpha=0.12, label="+-1 std")
    if len(mean) >= window:
        smooth = [sum(mean[max(0, i - window + 1): i + 1]) / len(mean[max(0, i - window + 1): i + 1])
                  for i in range(len(mean))]
        ax.plot(steps, smooth, lw=2, label=f"moving mean ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(reward_name)
    ax.set_title("training reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path
