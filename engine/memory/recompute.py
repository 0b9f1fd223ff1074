"""Memory policies: how a UNet call inside the gradient window keeps (or drops) its activations.

The trajectory runner calls `policy.unet_call(fn, *args, window_pos=i)` for each grad-carrying
UNet call, where `window_pos` counts calls from the first window step (0, 1, ...). `fn(*args)`
is the whole guided noise prediction of one step. Decode and reward go through
`policy.decode_call` / `policy.reward_call`. This is the one pluggable place for the memory policy.

Policies:
    none       keep every activation of every window step (the baseline).
    full       checkpoint every UNet call: keep its inputs, recompute it during backward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


class MemoryPolicy:
    name = "base"

    def __init__(self, checkpoint_decode: bool = True, checkpoint_reward: bool = True):
        self.checkpoint_decode = checkpoint_decode
        self.checkpoint_reward = checkpoint_reward

    def unet_call(self, fn: Callable, *args, window_pos: int = 0):
        raise NotImplementedError

    def decode_call(self, fn: Callable, *args):
        return _checkpointed(fn, *args) if self.checkpoint_decode else fn(*args)

    def reward_call(self, fn: Callable, *args):
        return _checkpointed(fn, *args) if self.checkpoint_reward else fn(*args)


def _checkpointed(fn, *args, **kwargs):
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


class NoRecompute(MemoryPolicy):
    name = "none"

    def unet_call(self, fn, *args, window_pos=0):
        return fn(*args)


class FullRecompute(MemoryPolicy):
    name = "full"

    def unet_call(self, fn, *args, window_pos=0):
        return _checkpointed(fn, *args)


POLICIES: dict[str, type[MemoryPolicy]] = {"none": NoRecompute, "full": FullRecompute}


def build_policy(name: str, **kwargs) -> MemoryPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown --recompute {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
