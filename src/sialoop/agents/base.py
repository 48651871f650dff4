"""The agents' contracts: what the loop gives the Feedback-Agent and the Meta-Agent, and what
they give back. Offline agents (rules, a knob search) and LLM agents implement the same two
Protocols and are chosen by name from config (`agents/registry.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

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
    unavailable: dict[str, str] = Field(default_factory=dict)  # lever -> why this run lacks it


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


class TrajectoryView(Record):
    """One trajectory as an LLM agent reads it: everything trimmed to a few hundred characters,
    its policy calls cut to their ends. Train inputs only; never a label."""

    instance_id: str
    split: str
    sample: int = 0
    inputs: str = ""
    output: str = ""
    score: float | None = None
    correct: bool | None = None
    error: str | None = None
    logs: str = ""
    calls: tuple[dict[str, str], ...] = ()
    seconds: float = 0.0
    tokens: int | None = None


class PastEdit(Record):
    """One candidate the run made, as the Meta-Agent is shown it so as not to repeat it."""

    version_id: str
    parent_id: str | None
    lever: str
    status: str
    val: float | None
    note: str
    diff: str = ""
    error: str | None = None


class EditRequest(Record):
    """What an LLM Meta-Agent receives to rewrite the incumbent harness."""

    generation: int
    task_spec: str
    metric: Metric
    parent_id: str
    parent_val: float | None
    source: str
    decision: Decision
    trajectories: tuple[TrajectoryView, ...] = ()
    n_trajectories: int = 0  # before the cap
    edits: tuple[PastEdit, ...] = ()


@runtime_checkable
class HarnessWriter(Protocol):
    """A Meta-Agent that writes harness code (an LLM) rather than knob settings. The lever
    validates what it writes; `repair` gets the error once; then `fallback` makes the
    generation's candidate."""

    fallback: MetaAgent
    label: str

    def edit(self, request: EditRequest) -> tuple[str, str]:
        """(new source, why). Raises EditError or LLMUnavailable."""
        ...

    def repair(self, request: EditRequest, error: str) -> tuple[str, str]:
        """The previous edit's error goes back to the model: (new source, why)."""
        ...
