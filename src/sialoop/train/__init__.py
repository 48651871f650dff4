"""The weights lever: LoRA adapters trained on stored trajectories and train labels.

`method(name)` is the strategy object the loop picks from config; datasets come from
`sialoop.train.data`. Importing this package does not import torch (the methods do).
"""

from __future__ import annotations

from sialoop.train.base import (
    LoraSettings,
    TrainerMethod,
    TrainError,
    TrainExample,
    TrainSettings,
    TrainSummary,
)
from sialoop.train.data import dpo_pairs, grpo_groups, ppo_episodes, sft_examples

METHODS = ("sft", "grpo", "dpo", "ppo")

__all__ = [
    "METHODS",
    "LoraSettings",
    "TrainError",
    "TrainExample",
    "TrainSettings",
    "TrainSummary",
    "TrainerMethod",
    "dpo_pairs",
    "grpo_groups",
    "method",
    "ppo_episodes",
    "sft_examples",
]


def method(name: str) -> TrainerMethod:
    """The training method called `name` (one of METHODS)."""
    if name == "sft":
        from sialoop.train.sft import SFT

        return SFT()
    if name == "grpo":
        from sialoop.train.grpo import GRPO

        return GRPO()
    if name == "dpo":
        from sialoop.train.dpo import DPO

        return DPO()
    if name == "ppo":
        from sialoop.train.ppo import PPO

        return PPO()
    raise TrainError(f"unknown training method {name!r}; choose one of {', '.join(METHODS)}")
