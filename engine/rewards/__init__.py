"""Differentiable rewards. Importing the package imports every reward module, which registers
its rewards in `base.REWARDS`; `base` itself imports none of them (no import cycle)."""
from . import aesthetic, hps, imagereward, pickscore, toy, toyworld_gold, toyworld_proxy  # noqa: F401  (registration)
from .base import REWARDS, Reward, RewardSpecError, RewardWeightsError, build_reward, check_reward_spec

__all__ = ["REWARDS", "Reward", "RewardSpecError", "RewardWeightsError", "build_reward", "check_reward_spec"]
