"""GRPO on stored groups: thin glue over peft (`sialoop.train.engine`), offline and on-policy only
in the sense that the stored completions came from the policy being trained.

Per group (examples sharing `TrainExample.group`), advantage = (reward - mean) / (std + eps) with
the population std of the group's rewards. A group whose rewards are all equal carries no signal
and is skipped (counted in `TrainSummary.skipped_groups`); if every group is skipped, `train`
raises `TrainError` rather than save an adapter that equals the base model.

Loss per batch: -mean_i(A_i * sum_t log p(c_it)) + kl_coef * mean_t k3(t), where
k3 = exp(ref - pol) - (ref - pol) - 1 (Schulman's unbiased, non-negative KL estimator) per completion
token and `ref` is the logprob with the adapter disabled (the base model). The logits are divided by
`settings.temperature` for both. Each epoch shuffles whole groups, so a batch holds whole groups
(cut at `batch_size`) and members sharing a prompt run it once. There is no importance ratio or clipping: the gradient is GRPO's at ratio 1 (the
first update on fresh samples); further epochs reuse the same samples without correction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from sialoop.train import engine
from sialoop.train.base import LoraSettings, TrainError, TrainExample, TrainSettings, TrainSummary

EPS = 1e-4


def advantages(
    examples: Sequence[TrainExample], group_size: int | None
) -> tuple[list[tuple[TrainExample, float]], int, int]:
    """(example, advantage) for every member of a group with reward variance, the number of groups,
    and the number skipped. Groups keep their first `group_size` members in the order given."""
    groups: dict[str, list[TrainExample]] = {}
    for e in examples:
        if e.reward is None or e.group is None:
            raise TrainError("GRPO needs examples with a reward and a group: see grpo_groups")
        groups.setdefault(e.group, []).append(e)
    kept: list[tuple[TrainExample, float]] = []
    skipped = 0
    for members in groups.values():
        members = members[:group_size] if group_size else members
        rewards = [float(m.reward or 0.0) for m in members]
        std = statistics.pstdev(rewards)
        if len(members) < 2 or std < 1e-8:
            skipped += 1
            continue
        mean = statistics.fmean(rewards)
        kept += [(m, (r - mean) / (std + EPS)) for m, r in zip(members, rewards, strict=True)]
    return kept, len(groups), skipped


def grpo_loss(settings: TrainSettings) -> engine.Objective:
    def loss(policy: engine.Policy, batch: engine.Batch, logged: dict[str, float]) -> torch.Tensor:
        logprobs = engine.token_logprobs(policy, batch, settings.temperature)
        # Each sequence's mean over its tokens, as DeepSeekMath's GRPO: with sums, a long
        # low-reward sample (junk sampled at temperature 1) outweighs the short right answers.
        policy_gradient = -(batch.values * engine.per_example(logprobs, batch, mean=True)).mean()
        if not settings.kl_coef:
            return policy_gradient
        with torch.no_grad(), policy.model.disable_adapter():
            ref = engine.token_logprobs(policy, batch, settings.temperature)
        diff = ref - logprobs
        kl = (torch.exp(diff) - diff - 1).mean()
        logged["kl"] = kl.item()
        return policy_gradient + settings.kl_coef * kl

    return loss


class GRPO:
    """`TrainerMethod` "grpo": needs examples with `reward` and `group` (`sialoop.train.data`)."""

    name = "grpo"

    def train(
        self,
        model_dir: Path,
        examples: Sequence[TrainExample],
        out_dir: Path,
        settings: TrainSettings,
        lora: LoraSettings,
        progress: Console | None = None,
    ) -> TrainSummary:
        started = time.perf_counter()
        if not examples:
            raise TrainError(
                "GRPO got no examples: no train trajectory had a scored option set or a sampled "
                "answer; use a harness that scores options or samples, or SFT on gold"
            )
        kept, n_groups, skipped = advantages(examples, settings.group_size)
        if not kept:
            raise TrainError(
                f"GRPO has nothing to learn from: all {n_groups} groups have equal rewards "
                "(every member right or every member wrong); sample more or use SFT on gold"
            )
        print_ = engine.fingerprint(self.name, model_dir, examples, settings, lora)
        if (done := engine.finished(out_dir, print_)) is not None:
            return done
        policy = engine.load_policy(model_dir, settings, lora)
        items = [
            engine.encode(policy, e, settings.max_len, a, e.group, with_reward=True)
            for e, a in kept
        ]
        job = engine.Job(out_dir, print_, "grpo", progress)
        fit = engine.fit(policy, items, settings, grpo_loss(settings), job)
        summary = engine.summarize(
            self.name,
            fit,
            len(kept),
            started,
            out_dir,
            mean_reward=statistics.fmean(float(e.reward or 0.0) for e in examples),
            groups=n_groups,
            skipped_groups=skipped,
        )
        return engine.finish(job, policy, summary)
