"""LoRA supervised fine-tuning: maximise log p(completion | prompt), averaged over completion tokens.

A thin explicit loop over peft (`sialoop.train.engine`) rather than TRL's SFTTrainer: it scores
exactly the completion tokens the policy endpoint scores, computes logits only for them (the
vocabulary has 262,144 entries), and shares checkpointing with GRPO.
Guarantees: those of `sialoop.train.engine` (one `<bos>`, left truncation, atomic checkpoints,
resume). The loss is the mean negative logprob over the completion tokens of a batch, so a long
completion weighs more than a short one; prompt tokens carry no loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from sialoop.train import engine
from sialoop.train.base import LoraSettings, TrainError, TrainExample, TrainSettings, TrainSummary


def sft_loss(policy: engine.Policy, batch: engine.Batch, logged: dict[str, float]) -> torch.Tensor:
    return -engine.token_logprobs(policy, batch).mean()


class SFT:
    """`TrainerMethod` "sft": needs examples with a non-empty completion; reward and group are
    ignored."""

    name = "sft"

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
            raise TrainError("SFT got no examples: the store has no usable train trajectories")
        print_ = engine.fingerprint(self.name, model_dir, examples, settings, lora)
        if (done := engine.finished(out_dir, print_)) is not None:
            return done
        policy = engine.load_policy(model_dir, settings, lora)
        items = [engine.encode(policy, e, settings.max_len) for e in examples]
        job = engine.Job(out_dir, print_, "sft", progress)
        fit = engine.fit(policy, items, settings, sft_loss, job)
        summary = engine.summarize(self.name, fit, len(examples), started, out_dir)
        return engine.finish(job, policy, summary)
