"""Differentiable image and prompt preprocessing for the reward models.

Every reward model was trained on images that went through a PIL/torchvision pipeline:
resize the shorter side to `size` with antialiased bicubic, center-crop `size` x `size`,
scale to [0, 1], normalize with a per-channel mean and std. Those pipelines cut the gradient (PIL,
uint8), so the rewards here redo the same steps with torch ops on the [0, 1] float image:

    torch.nn.functional.interpolate(mode="bicubic", antialias=True)

computes PIL's antialiased bicubic filter (Keys kernel, a = -0.5, support scaled by the
downsampling factor). What it does not do is round the result to uint8 and clip it to [0, 255]
as PIL does; that rounding is the bulk of the measured difference to the official processors
(tests/rewards/test_preprocess.py measures it, the tolerances are stated there and in the README
of the rewards).

Center crop offsets follow the processor each model shipped with: transformers'
CLIPImageProcessor floors (H - size) / 2, torchvision's CenterCrop (open_clip, BLIP) rounds it.
They differ by one pixel only when H - size is odd; generated square images never hit that case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

#: The OpenAI CLIP normalization; all four reward models use it (OpenCLIP's laion2b ViT-H/14,
#: PickScore's processor and ImageReward's BLIP transform copy the OpenAI values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize shorter side -> center crop -> normalize, all differentiable.

    crop_rounding: "floor" (transformers CLIPImageProcessor) or "round" (torchvision CenterCrop,
    used by open_clip and BLIP).
    """

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_rounding: str = "floor"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shorter_side(images, self.size)
        x = center_crop(x, self.size, self.crop_rounding)
        return normalize(x, self.mean, self.std)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16 inputs; float64 stays float64 (gradient checks run in it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Scale so the shorter side is `size`; the longer becomes int(size * long / short).

    That truncation is what both CLIPImageProcessor and torchvision's Resize(int) compute.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return images
    # float32 for the filter: bf16 interpolation loses about two bits against PIL's reference.
    out = F.interpolate(at_least_float32(images), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return out.to(images.dtype)


def center_crop(images: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}x{size}")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    elif rounding == "round":
        # Python's round is half-to-even, like torchvision's int(round(...)).
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        raise ValueError(f"center_crop rounding must be 'floor' or 'round', got {rounding!r}")
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, device=None) -> dict[str, torch.Tensor]:
    """Pad/truncate to exactly `max_length` tokens, as every reward model's own code does."""
    enc = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
