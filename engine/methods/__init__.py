"""Methods by name: each is a window policy plus a loss."""
from __future__ import annotations

from .alignprop import AlignProp
from .base import Method, Rollout, SamplingChain
from .draft import DRaFT, DRaFTLV
from .imagerefl import ImageReFL
from .refl import ReFL

METHODS: dict[str, type[Method]] = {m.name: m for m in (ReFL, DRaFT, DRaFTLV, AlignProp, ImageReFL)}


def build_method(cfg) -> Method:
    from ..config import ConfigError

    if cfg.method not in METHODS:
        raise ConfigError(f"unknown --method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "Method", "Rollout", "SamplingChain", "build_method"]
