"""PPO with GAE on stored episodes (`sialoop.train.data.ppo_episodes`): thin glue over peft
(`sialoop.train.engine`), the clipped objective of Schulman et al. (2017) with generalised
advantage estimation (Schulman et al., 2016), token by token.

Data: every sampled call of an episode is one sequence whose tokens all get credit from the
episode's reward (a multi-call episode gives several sequences with one reward). The reward
arrives at a sequence's last token; every other token's reward is 0.

Before the first step (and again from the same start on a resume) one pass of the starting
policy gives, per completion token, the old logprob (that policy in the training dtype: the
recorded sampling-time logprobs are only compared with it, `TrainSummary.logprob_gap`, since
an endpoint in another dtype or a different batch shape makes them differ slightly) and the old
value. The starting policy is also the KL reference: the parent's adapter when the Decision
continues it, else the base model.

    delta_t = r_t + gamma * V(t+1) - V(t)        (V after the last token: 0)
    A_t     = sum_l (gamma * lam)^l * delta_(t+l), whitened over all tokens
    R_t     = A_t (before whitening) + V(t)
    loss    = -mean min(ratio_t A_t, clip(ratio_t, 1 - clip, 1 + clip) A_t)
              + vf_coef * 0.5 * mean max((V_t - R_t)^2, (V_old + clip(V_t - V_old, +-value_clip) - R_t)^2)
              + kl_coef * mean k3(ref_t - logp_t)

with ratio_t = exp(logp_t - old_t) and k3 Schulman's non-negative KL estimator (as in GRPO). The
value head is one linear layer on the policy's last hidden state (the LoRA trunk is shared), its
bias started at the mean reward; it is checkpointed with the adapter and saved beside it as
`value_head.pt`, and a candidate continuing a parent's PPO adapter continues its value head.
Optimizer steps cycle through the sequences in minibatches of `batch_size` (`max_steps` steps:
as many minibatch epochs as that makes).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from sialoop.train import engine
from sialoop.train.base import LoraSettings, TrainError, TrainExample, TrainSettings, TrainSummary

VALUE_HEAD = "value_head"


def gae(
    rewards: Sequence[float], values: Sequence[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Advantages and returns of one sequence from its per-token rewards and old values."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        following = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def clipped_surrogate(
    logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss (mean over tokens) and the share of tokens the clip bounds."""
    ratio = torch.exp(logprobs - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    loss = -torch.min(unclipped, clipped).mean()
    return loss, ((ratio - 1).abs() > clip).float().mean()


def value_loss(
    values: torch.Tensor, old: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    clipped = old + torch.clamp(values - old, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()


def _value_head(policy: engine.Policy, bias: float, init: Path | None) -> torch.nn.Linear:
    hidden = policy.model.get_base_model().config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, bias)
    if init is not None and init.is_file():  # the parent's PPO value head, with its adapter
        head.load_state_dict(torch.load(init, weights_only=True))
    return head


def _values(policy: engine.Policy, hidden: torch.Tensor) -> torch.Tensor:
    return policy.extras[VALUE_HEAD](hidden.float()).squeeze(-1)


@torch.no_grad()
def _experience(
    policy: engine.Policy, items: list[engine.Encoded], chunk: int, temperature: float
) -> list[tuple[list[float], list[float]]]:
    """Each sequence's old logprobs and old values, under the starting policy."""
    policy.model.eval()
    out = []
    for i in range(0, len(items), chunk):
        batch = engine.collate(items[i : i + chunk], policy.pad)
        hidden = engine.completion_hidden(policy, batch)
        logprobs = engine.head_logprobs(policy, hidden, batch, temperature).tolist()
        values = _values(policy, hidden).tolist()
        at = 0
        for e in batch.items:
            n = len(e.ids) - e.start
            out.append((logprobs[at : at + n], values[at : at + n]))
            at += n
    return out


def _gap(examples: Sequence[TrainExample], old: list[list[float]]) -> float | None:
    diffs = [
        abs(a - b)
        for e, lp in zip(examples, old, strict=True)
        if e.logprobs is not None and len(e.logprobs) == len(lp)
        for a, b in zip(e.logprobs, lp, strict=True)
    ]
    return statistics.fmean(diffs) if diffs else None


def ppo_loss(settings: TrainSettings) -> engine.Objective:
    def loss(policy: engine.Policy, batch: engine.Batch, logged: dict[str, float]) -> torch.Tensor:
        hidden = engine.completion_hidden(policy, batch)
        logprobs = engine.head_logprobs(policy, hidden, batch, settings.temperature)
        values = _values(policy, hidden)
        old, adv = batch.per_token["old"], batch.per_token["advantage"]
        policy_loss, clipped = clipped_surrogate(logprobs, old, adv, settings.clip)
        vf = value_loss(
            values, batch.per_token["value"], batch.per_token["return"], settings.value_clip
        )
        diff = old - logprobs  # the reference is the starting policy: its logprobs are `old`
        kl = (torch.exp(diff) - diff - 1).mean()
        logged.update(kl=kl.item(), value_loss=vf.item(), clip_fraction=clipped.item())
        return policy_loss + settings.vf_coef * vf + settings.kl_coef * kl

    return loss


class PPO:
    """`TrainerMethod` "ppo": needs sampled calls with an episode reward (`ppo_episodes`)."""

    name = "ppo"

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
                "PPO has nothing to learn from: no stored episode sampled tokens (an "
                "option-scoring harness samples nothing; SFT or DPO fit it)"
            )
        if any(e.reward is None for e in examples):
            raise TrainError("PPO needs every example's episode reward: see ppo_episodes")
        print_ = engine.fingerprint(self.name, model_dir, examples, settings, lora)
        if (done := engine.finished(out_dir, print_)) is not None:
            return done
        policy = engine.load_policy(model_dir, settings, lora)
        rewards = [float(e.reward or 0.0) for e in examples]
        parent_head = (
            Path(settings.init_adapter).parent / f"{VALUE_HEAD}.pt"
            if settings.init_adapter
            else None
        )
        policy.extras[VALUE_HEAD] = _value_head(policy, statistics.fmean(rewards), parent_head)
        items = [engine.encode(policy, e, settings.max_len, with_reward=True) for e in examples]
        old = _experience(policy, items, settings.batch_size, settings.temperature)
        per_seq = []
        for reward, (lp, v) in zip(rewards, old, strict=True):
            token_rewards = [0.0] * (len(lp) - 1) + [reward]
            adv, ret = gae(token_rewards, v, settings.gamma, settings.lam)
            per_seq.append((lp, v, adv, ret))
        flat = [a for _, _, adv, _ in per_seq for a in adv]
        mean, std = statistics.fmean(flat), statistics.pstdev(flat) if len(flat) > 1 else 0.0
        if std < 1e-8:
            raise TrainError(
                f"PPO has no signal: every episode has the reward {rewards[0]:g} and the value "
                "head predicts it; sample episodes whose scores differ"
            )
        items = [
            dataclasses.replace(
                e,
                per_token={
                    "old": tuple(lp),
                    "value": tuple(v),
                    "return": tuple(ret),
                    "advantage": tuple((a - mean) / std for a in adv),
                },
            )
            for e, (lp, v, adv, ret) in zip(items, per_seq, strict=True)
        ]
        job = engine.Job(out_dir, print_, "ppo", progress)
        fit = engine.fit(policy, items, settings, ppo_loss(settings), job)
        last = {name: curve[-1] for name, curve in fit.curves.items() if curve}
        summary = engine.summarize(
            self.name, fit, len(items), started, out_dir, mean_reward=statistics.fmean(rewards),
            groups=len({e.group for e in examples}), kl=last.get("kl"),
            value_loss=last.get("value_loss"), clip_fraction=last.get("clip_fraction"),
            logprob_gap=_gap(examples, [lp for lp, *_ in per_seq]),
        )  # fmt: skip
        return engine.finish(job, policy, summary)
