"""Plain-PyTorch references of the fused kernels: the ground truth for tests and benchmarks.

Both functions are ordinary differentiable torch code, so autograd gives the reference
gradients. They run in whatever dtype they are given (float64 for ground truth, the low
precision itself to measure "plain torch error" for the tolerance rule) and on any device,
including "meta" (shape/byte accounting without data).

They are also the *unfused* baselines of the benchmarks: `attention` materialises the
(B, H, Nq, Nk) probability matrix and autograd saves it; `group_norm(..., activation="silu")`
runs GroupNorm and SiLU as two ops, so autograd saves the normalised tensor as well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Nq, D), k and v (B, H, Nk, D); scale defaults to D**-0.5."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Natural-log log-sum-exp of the scaled scores per query row, (B, H, Nq): what the kernel saves."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """GroupNorm over (C/G, *spatial) per sample and group, then the optional activation ("silu")."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    # Written out rather than F.group_norm, which refuses groups of one element (G = C at 1x1).
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = (xg - mean).square().mean(dim=-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine_shape)
    if bias is not None:
        y = y + bias.reshape(affine_shape)
    if activation == "silu":
        y = F.silu(y)
    return y
