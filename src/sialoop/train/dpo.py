"""DPO on stored pairs (`sialoop.train.data.dpo_pairs`): thin glue over peft
(`sialoop.train.engine`), the loss of Rafailov et al. (2023):

    loss = -log sigmoid(beta * ((log p(chosen) - ref(chosen)) - (log p(rejected) - ref(rejected))))

with log p the summed completion-token logprobs. The reference is the policy training starts
from: the parent's adapter when the Decision continues it (`init_adapter`), else the base model.
Its logprobs are computed once, before the first step (and again from the same starting point
on a resume), so the reference never drifts and costs no forward pass per step.

A pair is two examples sharing `group`, the higher reward chosen; a group that is not exactly two
examples with different rewards is skipped and counted. Each batch holds whole pairs: the batch
size is rounded up to an even number of examples. TRL's DPOTrainer would bring its own data
collator and reference-model handling; this loop shares the engine's tokenisation (the
endpoint's), checkpoints and resume with SFT and GRPO.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from sialoop.train import engine
from sialoop.train.base import LoraSettings, TrainError, TrainExample, TrainSettings, TrainSummary


def pairs(examples: Sequence[TrainExample]) -> tuple[list[tuple[TrainExample, TrainExample]], int]:
    """(chosen, rejected) per usable group, and the number of groups skipped."""
    groups: dict[str, list[TrainExample]] = {}
    for e in examples:
        if e.reward is None or e.group is None:
            raise TrainError("DPO needs examples with a reward and a group: see dpo_pairs")
        groups.setdefault(e.group, []).append(e)
    out, skipped = [], 0
    for members in groups.values():
        if len(members) != 2 or members[0].reward == members[1].reward:
            skipped += 1
            continue
        a, b = members
        out.append((a, b) if (a.reward or 0.0) > (b.reward or 0.0) else (b, a))
    return out, skipped


def _sums(policy: engine.Policy, batch: engine.Batch) -> torch.Tensor:
    return engine.per_example(engine.token_logprobs(policy, batch), batch)


@torch.no_grad()
def reference_logprobs(
    policy: engine.Policy, items: Sequence[engine.Encoded], chunk: int
) -> list[float]:
    """Each item's summed completion logprob under the policy as it is now (the reference)."""
    policy.model.eval()
    out: list[float] = []
    for i in range(0, len(items), chunk):
        batch = engine.collate(items[i : i + chunk], policy.pad)
        out += _sums(policy, batch).tolist()
    policy.model.train()
    return out


def dpo_loss(beta: float) -> engine.Objective:
    def loss(policy: engine.Policy, batch: engine.Batch, logged: dict[str, float]) -> torch.Tensor:
        units = [e.unit for e in batch.items]
        if len(units) % 2 or any(units[i] != units[i + 1] for i in range(0, len(units), 2)):
            raise TrainError("a DPO batch must hold whole pairs (chosen, rejected)")
        ratio = _sums(policy, batch) - batch.values  # log p - ref, per example
        margin = beta * (ratio[0::2] - ratio[1::2])
        # TRL's rewards/margins and rewards/accuracies: the implicit reward's gap and how often
        # the chosen answer's exceeds the rejected one's
        logged["margin"] = margin.mean().item()
        logged["accuracy"] = (margin > 0).float().mean().item()
        return -F.logsigmoid(margin).mean()

    return loss


class DPO:
    """`TrainerMethod` "dpo": needs pairs from `sialoop.train.data.dpo_pairs`."""

    name = "dpo"

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
        kept, skipped = pairs(examples)
        if not kept:
            raise TrainError(
                f"DPO has no pair to learn from ({skipped} groups skipped): it needs a chosen "
                "and a rejected answer per instance (gold and a wrong option, or samples whose "
                "scores differ)"
            )
        even = settings.batch_size + settings.batch_size % 2
        settings = settings.model_copy(update={"batch_size": even})
        print_ = engine.fingerprint(self.name, model_dir, examples, settings, lora)
        if (done := engine.finished(out_dir, print_)) is not None:
            return done
        policy = engine.load_policy(model_dir, settings, lora)
        items = []
        for chosen, rejected in kept:
            unit = chosen.group
            items += [
                engine.encode(policy, chosen, settings.max_len, 0.0, unit),
                engine.encode(policy, rejected, settings.max_len, 0.0, unit),
            ]
        refs = reference_logprobs(policy, items, even)
        items = [dataclasses.replace(e, value=r) for e, r in zip(items, refs, strict=True)]
        job = engine.Job(out_dir, print_, "dpo", progress)
        fit = engine.fit(policy, items, settings, dpo_loss(settings.beta), job)
        summary = engine.summarize(
            self.name, fit, len(kept), started, out_dir, groups=len(kept) + skipped,
            skipped_groups=skipped,
        )  # fmt: skip
        return engine.finish(job, policy, summary)
