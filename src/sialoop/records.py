"""Typed records that cross module boundaries: what the store writes and every reader reads.

All records are frozen pydantic models carrying `schema_version`, so a run directory written
by an older sialoop can be recognised. A score that was never computed is `None`, never 0.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def new_id(prefix: str) -> str:
    """A short unique id such as `ep-3f2a9c1b7d4e`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = SCHEMA_VERSION


class LLMCall(Record):
    """One request to the policy endpoint, as the endpoint served it."""

    call_id: str = Field(default_factory=lambda: new_id("call"))
    episode_id: str | None
    endpoint: str  # "completions" | "chat.completions"
    adapter: str  # "base" or a version id
    prompt: str | list[dict[str, Any]]  # text, or chat messages
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    token_logprobs: list[float | None] | None = None  # per returned token (echoed prompt first)
    params: dict[str, Any] = Field(default_factory=dict)  # sampling parameters as sent
    latency_s: float
    tokens: int | None = None  # an external policy's count, where its token ids are unknown
    created_at: float = Field(default_factory=time.time)

    @property
    def scoring_only(self) -> bool:
        """Option scoring: the prompt's logprobs echoed with max_tokens 0, nothing sampled.
        (`Store.episode_shape` applies the same rule in SQL.)"""
        return self.params.get("max_tokens") == 0

    @property
    def sampled_tokens(self) -> int:
        """Tokens the policy sampled in this call (0 for option scoring)."""
        return 0 if self.scoring_only else len(self.completion_token_ids)


class AgentCall(Record):
    """One request of an LLM agent (Meta-Agent or Feedback-Agent), stored like a policy call:
    what was sent, what came back, its tokens, cost and seconds. A request that failed after its
    retries keeps its error and an empty response."""

    call_id: str = Field(default_factory=lambda: new_id("agent"))
    role: str  # "meta" | "feedback"
    purpose: str  # "edit", "repair", "decide", "retry"
    generation: int | None = None
    provider: str
    model: str
    system: str
    messages: list[dict[str, Any]]
    response: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None  # None: the config names no price
    seconds: float
    attempts: int = 1  # requests sent, retries included
    error: str | None = None
    created_at: float = Field(default_factory=time.time)


class ErrorKind(StrEnum):
    """Where and how a rollout failed (a failed rollout is data, not a crash)."""

    timeout = "timeout"
    memory = "memory"
    crash = "crash"  # the harness raised
    forbidden = "forbidden"  # network, subprocess, secrets: blocked by the sandbox
    killed = "killed"  # the worker died (signal, file-size limit, process limit)
    invalid_output = "invalid_output"  # not JSON-serialisable, or rejected by the task
    policy = "policy"  # the endpoint failed
    setup = "setup"  # the harness's `setup()` raised or ran past its budget: no item was tried


class RolloutError(Record):
    kind: ErrorKind
    message: str
    # The machine's fault, not the harness's: a SIGKILL the worker did not ask for (the OOM
    # killer, a kill from outside) or a timeout on a worker's first item after a (re)start.
    infra: bool = False


class Score(Record):
    """A task's verdict on one output. `value` is the reward in [0, 1] for classification."""

    value: float
    correct: bool | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    # Seconds the scorer spent running the output, where the output is a program the task runs
    # (a denoiser): part of what the output costs, beside the harness's own seconds.
    seconds: float | None = None


class Trajectory(Record):
    """One harness run on one instance."""

    trajectory_id: str = Field(default_factory=lambda: new_id("ep"))
    run_id: str
    version_id: str
    split: str
    instance_id: str
    sample: int = 0
    output: Any = None
    score: Score | None = None
    error: RolloutError | None = None
    logs: str = ""
    seconds: float
    tokens: int | None = None  # prompt + completion tokens of the episode's LLM calls
    calls: int | None = None  # the episode's LLM calls (None: not counted)
    sampled_tokens: int | None = None  # tokens the policy sampled in them (not option scoring)
    attempts: int = 1  # 2: the first attempt failed for the machine's reasons and was retried
    created_at: float = Field(default_factory=time.time)

    @property
    def cost_seconds(self) -> float:
        """What the item cost: the harness's seconds plus the scorer's run of its program."""
        return self.seconds + ((self.score.seconds or 0.0) if self.score else 0.0)


class Version(Record):
    """A (harness, adapter) pair: the unit that gets scored, accepted or rejected."""

    version_id: str
    run_id: str
    parent_id: str | None
    generation: int
    harness_path: str  # relative to the run directory
    adapter: str = "base"  # "base", or the id of the version whose training made the adapter
    status: str = "candidate"  # candidate | accepted | rejected | broken
    note: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)  # operator or training summary, gate
    created_at: float = Field(default_factory=time.time)


class Evaluation(Record):
    """A version's score on one split, aggregated from stored trajectories."""

    evaluation_id: str = Field(default_factory=lambda: new_id("eval"))
    run_id: str
    version_id: str
    split: str  # train | val | test, or "holdout": val items the search never used
    metric: str
    direction: str = "higher"  # the metric's: "higher" or "lower" is better
    value: float | None  # None when the split's value was never computed
    n: int
    n_errors: int
    seconds: float
    seconds_per_item: float | None = None  # mean Trajectory.cost_seconds
    tokens_per_item: float | None = None  # mean LLM tokens per trajectory (None: unknown)
    forced: bool = False  # a forced re-score of test (see `sialoop eval --force`)
    infra_failures: int = 0  # items whose final error was the machine's (RolloutError.infra)
    degraded: bool = False  # infra_failures above the allowed share: not a clean score
    detail: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)


class Lever(StrEnum):
    harness = "harness"
    weights = "weights"
    stop = "stop"
    baseline = "baseline"  # generation 0


class Decision(Record):
    """The Feedback-Agent's choice for one generation and the numbers it rests on."""

    decision_id: str = Field(default_factory=lambda: new_id("dec"))
    run_id: str
    generation: int
    lever: Lever
    rationale: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    method: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)


class RunInfo(Record):
    run_id: str
    task: str
    config: dict[str, Any]
    sialoop_version: str | None = None  # the package version that created the run
    status: str = "running"  # running | finished | failed | interrupted
    reason: str | None = None  # why a failed or interrupted run stopped
    created_at: float = Field(default_factory=time.time)
