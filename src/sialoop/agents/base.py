"""The agents' contracts: what the loop gives the Feedback-Agent and the Meta-Agent, and what
they give back. Offline agents (rules, a knob search) and LLM agents implement the same two
Protocols and are chosen by name from config (`agents/registry.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from sialoop.harness.knobs import Declarations
from sialoop.records import Decision, Record, Trajectory
from sialoop.tasks.base import Metric


class Outcome(Record):
    """What became of one past Decision: whether its candidate was accepted on val, the val
    gain it brought in the metric's direction (candidate minus incumbent, sign-adjusted so that
    positive is better; None when the candidate was never scored), and its wall minutes."""

    decision: Decision
    accepted: bool
    val_gain: float | None
    minutes: float


class History(Record):
    """The run's past Decisions and what became of them, oldest first."""

    outcomes: tuple[Outcome, ...] = ()


class Budget(Record):
    """What is left of the run. `generations_left` None means only minutes bound the run."""

    minutes_left: float
    generations_left: int | None = None


class FeedbackContext(Record):
    """What the Feedback-Agent knows besides trajectories: the task's metric, the incumbent
    harness's declarations (its knobs and the families its signals speak to), the levers this
    run may pull and the samples per train instance."""

    metric: Metric
    declarations: Declarations = Declarations()
    levers: tuple[str, ...] = ("harness", "weights")
    samples: int = 1


class FeedbackAgent(Protocol):
    def decide_before_rollout(
        self,
        history: History,
        budget: Budget,
        context: FeedbackContext,
        *,
        run_id: str,
        generation: int,
    ) -> Decision | None:
        """A Decision that needs no trajectory (a spent budget), else None."""
        ...

    def decide(
        self,
        trajectories: Sequence[Trajectory],
        history: History,
        budget: Budget,
        context: FeedbackContext,
        *,
        run_id: str,
        generation: int,
    ) -> Decision:
        """The next lever, with a rationale citing the evidence. For the harness lever,
        `settings` holds `focus` (a knob family or None), and optionally `raise` (a knob the
        evidence says to raise) and `gap` (how strongly); for weights, trainer settings."""
        ...


class TriedSetting(Record):
    """One harness version the run has made: its knob values, its parent, and its val score in
    "higher is better" orientation (`Metric.oriented`; None: broken or never scored)."""

    version_id: str
    parent_id: str | None
    values: dict[str, Any]
    oriented_score: float | None


class Proposal(BaseModel):
    """One harness edit: the knob values to set, why, and which search produced it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    assignments: dict[str, Any] = Field(min_length=1)
    why: str
    family: str | None = None
    search: Literal["focus", "optuna", "neighbour", "llm"] = "focus"


class MetaAgent(Protocol):
    def propose(
        self,
        source: str,
        decision: Decision,
        history: Sequence[TriedSetting],
        parent_id: str,
    ) -> Proposal | None:
        """A new setting for the parent harness `source` (never one in `history` with this
        parent), or None when nothing is left to try."""
        ...

    def write(self, source: str, proposal: Proposal) -> str:
        """The new harness source."""
        ...
