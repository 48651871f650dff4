"""The Trainer's contract: settings, the example and summary records, and the method interface.

A method (`sialoop.train.sft.SFT`, `sialoop.train.grpo.GRPO`) turns `TrainExample`s built from the
store (`sialoop.train.data`) into a LoRA adapter saved in peft's format. This module is torch-free
so the loop and the Feedback-Agent can read settings and summaries without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from sialoop.errors import SialoopError
from sialoop.records import Record

if TYPE_CHECKING:
    from rich.console import Console


class TrainError(SialoopError):
    """Training cannot run as asked: bad data, a mismatched checkpoint, nothing to learn from."""


class LoraSettings(BaseModel):
    """The LoRA adapter's shape (peft's `LoraConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class TrainSettings(BaseModel):
    """How to train. One optimizer step takes `batch_size` examples; the learning rate is constant.

    `max_steps` (when set) is the exact number of optimizer steps, cycling through the data as
    often as needed; otherwise `epochs` full passes are run. `max_len` counts tokens including
    `<bos>`: a longer example loses prompt tokens from the LEFT (after `<bos>`), so the completion
    survives; a completion that alone does not fit is an error. `checkpoint_every` = 0 writes no
    checkpoints. The GRPO fields are ignored by SFT: `group_size` keeps at most that many members
    of each group (in stored order); `temperature` is the one the completions were sampled at
    (1.0 for scored options): GRPO divides the logits by it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    # A peft adapter folder to continue training (the parent version's); None: a fresh adapter.
    init_adapter: str | None = None
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: int = Field(1, ge=1)
    max_len: int = Field(1024, ge=2)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_grad_norm: float | None = Field(1.0, gt=0)
    group_size: int | None = Field(None, ge=2)
    kl_coef: float = Field(0.04, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.1, gt=0)  # DPO: the scale of the chosen-minus-rejected log-ratio
    # PPO: the discount and GAE's lambda over completion tokens, the ratio's clip range, the
    # value loss's weight and clip range (`kl_coef` weighs the KL to the reference, as in GRPO).
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0, lt=1)
    vf_coef: float = Field(0.1, ge=0)
    value_clip: float = Field(0.2, gt=0)


class TrainExample(BaseModel):
    """One training text: the model reads `prompt` and learns (or is rewarded for) `completion`.

    `reward` and `group` are set for GRPO (examples with the same `group` are compared with each
    other) and DPO (a group is one pair: the higher reward is chosen), and unused by SFT.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str
    completion: str = Field(min_length=1)
    reward: float | None = None
    group: str | None = None
    # A sampled call as the endpoint recorded it (PPO): the token ids it saw and sampled, and
    # the sampled tokens' logprobs at sampling time where the harness asked for them.
    prompt_ids: tuple[int, ...] | None = None
    completion_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None


class TrainSummary(Record):
    """What one `train` call did. `losses` holds every optimizer step's loss, those run before a
    resume included; `seconds` is this call's wall time only. `mean_reward` (GRPO) is the mean
    stored reward of the examples given, i.e. of the policy that collected them."""

    method: str
    steps: int
    examples: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    losses: list[float] = Field(default_factory=list)
    # every step's other figures by name, as the method logs them: "reward" (the batch's mean
    # stored reward), "kl" (to the reference), DPO's "margin" and "accuracy", PPO's
    # "value_loss" and "clip_fraction"
    curves: dict[str, list[float]] = Field(default_factory=dict)
    # training tokens (prompt and completion) per second of the steps this call ran
    tokens_per_s: float | None = None
    mean_reward: float | None = None
    groups: int | None = None
    skipped_groups: int | None = None
    # PPO: the last step's KL to the reference, value loss and clipped share of tokens, and
    # the mean |sampling-time - training-time| logprob of the sampled tokens (None: the
    # harness recorded none), i.e. how far the endpoint's dtype is from the trainer's.
    kl: float | None = None
    value_loss: float | None = None
    clip_fraction: float | None = None
    logprob_gap: float | None = None
    adapter_dir: str
    resumed_from_step: int = 0


class TrainerMethod(Protocol):
    """A training method; `train` is resumable: called again with the same `out_dir`, settings
    and examples, it continues from the last checkpoint (or returns the finished summary)."""

    name: str

    def train(
        self,
        model_dir: Path,
        examples: Sequence[TrainExample],
        out_dir: Path,
        settings: TrainSettings,
        lora: LoraSettings,
        progress: Console | None = None,
    ) -> TrainSummary:
        """Trains a LoRA adapter on `model_dir` and saves it to `out_dir / "adapter"`."""
        ...
