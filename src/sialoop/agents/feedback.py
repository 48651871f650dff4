"""The Feedback-Agent: reads one generation's trajectories and the run's history and decides
which lever to pull next (harness, weights, or stop) and how.

`FeedbackAgent` is what the loop calls; `OfflineFeedbackAgent` is the rule- and statistics-based
default that CI runs (an LLM-backed agent implements the same Protocol). The offline agent rests
on evidence, not on a schedule, in three steps; every step cites its numbers in the rationale:

1. Stop when no generation is left, when the minutes left cannot fit the cheapest lever, when
   the batch is solved, or after `max_rejections` consecutive rejected candidates (both levers).
   The first two need no trajectory: `decide_before_rollout` applies them before the loop pays
   for the generation's rollout.
2. Each lever that fits the budget gets a proposal. Harness: the firing rule that addresses most
   of the batch among format failures (focus "format"), gold absent from the shortlist (focus
   "shortlist"), a prior the answer leaves unused (the harness's `prior_ranked` right more often
   than its answer: focus "scoring", hint "prior_up"), an answer bound by its prior (it follows
   the prior and gains nothing on it: focus "shortlist") and rollout errors (focus "format").
   Weights: a learnable pattern among wrong answers (gold often ranked 2..k, or confusions
   repeated across instances); the method is GRPO only when sampled groups show reward
   variance, else SFT. A lever with no firing rule gets a fallback proposal that says so.
3. Choose, in this order: a lever whose last `lever_patience` candidates were all rejected loses
   to one that was not; a supported lever beats a fallback; an untried lever is explored (while
   one attempt of it costs at most `explore_share` of the minutes left); the
   higher val gain per minute in history wins; the proposal that addresses more of the batch
   wins; the harness (the cheaper lever) breaks a full tie.

Guaranteed: no reward variance within sampled groups never yields GRPO; a Decision's
`evidence` holds the full `Evidence` dump plus `rule`, `chosen_by`, `focus` and the minute
estimates (a stop decided before the rollout holds only `rule`, `chosen_by` and the
estimates). `settings` holds, for the harness, `{"focus": ...}` (the Meta-Agent's operator
family, plus `hint` and `prior_gap` for an unused prior); for weights only trainer settings
(the configured `sft_settings` / `grpo_settings`, plus `group_size` for GRPO), so the trainer
can validate them as they are.
Not guaranteed: the thresholds are defaults, not tuned optima; minute estimates before a lever
has history are the settings' guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from sialoop.agents.evidence import Evidence, FailureClass, Outcome, compute_evidence
from sialoop.records import Decision, Lever, Record, Trajectory

__all__ = [
    "Budget",
    "FeedbackAgent",
    "Focus",
    "History",
    "OfflineFeedbackAgent",
    "OfflineFeedbackSettings",
    "Outcome",
]

_LEVER_ORDER = (Lever.harness, Lever.weights)  # the harness is cheaper: it wins a full tie
_CHOICE_REASONS = (
    "other_lever_stale",
    "support",
    "explore_untried",
    "gain_per_minute",
    "addressable",
    "tie",
)


class Focus(StrEnum):
    """The operator family a harness Decision points the Meta-Agent at."""

    format = "format"
    shortlist = "shortlist"
    examples = "examples"
    scoring = "scoring"


class History(Record):
    """The run's past Decisions and what became of them, oldest first."""

    outcomes: tuple[Outcome, ...] = ()


class Budget(Record):
    """What is left of the run. `generations_left` None means only minutes bound the run."""

    minutes_left: float
    generations_left: int | None = None


class OfflineFeedbackSettings(BaseModel):
    """Thresholds of the offline agent. Shares are fractions in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Harness rules.
    format_share: float = Field(default=0.15, ge=0, le=1)  # invalid + unparsable, of the batch
    error_share: float = Field(default=0.10, ge=0, le=1)  # timeouts, crashes, other errors
    absent_share: float = Field(default=0.30, ge=0, le=1)  # of ranked wrong: gold not shortlisted
    # The harness's prior (`prior_ranked`) right this much more often than its answer: unused.
    prior_gap: float = Field(default=0.05, gt=0, le=1)
    # The answer follows the prior this often (and gains nothing on it): the prior bounds it.
    prior_agreement: float = Field(default=0.85, gt=0, le=1)
    # Weights rule: fewer wrong answers than `min_wrong` are anecdotes, not a pattern.
    min_wrong: int = Field(default=5, ge=1)
    near_k: int = Field(default=3, ge=2)  # a near miss is gold ranked 2..near_k
    near_miss_share: float = Field(default=0.40, ge=0, le=1)  # of ranked wrong answers
    confusion_share: float = Field(default=0.30, ge=0, le=1)  # of wrong-valid, in repeated pairs
    # Method: GRPO's advantage is reward minus the group mean, so it needs groups that differ.
    grpo_min_groups: int = Field(default=4, ge=1)
    grpo_variance_share: float = Field(default=0.25, gt=0, le=1)
    sft_settings: dict[str, Any] = Field(default_factory=dict)  # passed to the trainer as is
    grpo_settings: dict[str, Any] = Field(default_factory=dict)
    weights_enabled: bool = True  # False for an external endpoint (no adapters)
    harness_enabled: bool = True  # False for a weights-only run
    # Choice and stopping.
    explore_untried: bool = True
    # An untried lever is explored only while one attempt of it costs at most this share of the
    # minutes left: spending the last of the budget on exploring leaves no time to use what the
    # other lever's evidence points at.
    explore_share: float = Field(default=0.5, gt=0, le=1)
    lever_patience: int = Field(default=2, ge=1)  # rejections in a row before a lever yields
    max_rejections: int = Field(default=5, ge=1)  # rejections in a row (both levers): stop
    solved_accuracy: float = Field(default=0.99, gt=0, le=1)
    # Minutes per attempt until history has its own mean.
    harness_minutes: float = Field(default=5.0, gt=0)
    sft_minutes: float = Field(default=20.0, gt=0)
    grpo_minutes: float = Field(default=40.0, gt=0)
    top: int = Field(default=5, ge=1)  # confusion pairs and worst classes kept in the evidence


class FeedbackAgent(Protocol):
    def decide(
        self,
        trajectories: Sequence[Trajectory],
        history: History,
        budget: Budget,
        *,
        run_id: str,
        generation: int,
    ) -> Decision:
        """The next lever for this run, with a rationale that cites the evidence."""
        ...


class _Proposal(BaseModel):
    model_config = ConfigDict(frozen=True)

    lever: Lever
    rule: str
    why: str
    supported: bool = True  # False: a fallback, no rule fired for this lever
    addressable: float = 0.0  # share of the batch this proposal's fix could turn correct
    method: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)  # harness: focus; weights: trainer's
    focus: str | None = None  # what the evidence points at, kept in the Decision's evidence


def _stop(rule: str, why: str) -> _Proposal:
    return _Proposal(lever=Lever.stop, rule=rule, why=f"Stop: {why}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


class OfflineFeedbackAgent:
    """Rules over `Evidence`; see the module docstring for the order they apply in."""

    def __init__(self, settings: OfflineFeedbackSettings | None = None) -> None:
        self.settings = settings or OfflineFeedbackSettings()

    def decide(
        self,
        trajectories: Sequence[Trajectory],
        history: History,
        budget: Budget,
        *,
        run_id: str,
        generation: int,
    ) -> Decision:
        if not trajectories:
            raise ValueError("the Feedback-Agent needs this generation's trajectories; got none")
        s = self.settings
        ev = compute_evidence(trajectories, history.outcomes, near_k=s.near_k, top=s.top)
        costs = self._minutes(history)
        chosen, chosen_by, why_over = self._stop(ev, budget, costs), "stop", ""
        if chosen is None:
            chosen, chosen_by, why_over = self._choose(ev, budget, costs)
        batch = (
            f"Batch: {ev.n} trajectories on {ev.n_instances} instances, accuracy "
            f"{ev.accuracy:.0%}; {budget.minutes_left:.0f} min left."
        )
        return Decision(
            run_id=run_id,
            generation=generation,
            lever=chosen.lever,
            rationale=" ".join(p for p in (chosen.why, why_over, batch) if p),
            evidence={
                **ev.model_dump(mode="json"),
                "rule": chosen.rule,
                "chosen_by": chosen_by,
                "focus": chosen.focus,
                "minutes_estimate": costs,
            },
            method=chosen.method,
            settings=chosen.settings,
        )

    # -- costs and stopping -------------------------------------------------------------------

    def _minutes(self, history: History) -> dict[str, float]:
        """Expected minutes per attempt: the mean of past attempts, else the settings' guess."""
        s = self.settings

        def mean(lever: Lever, method: str | None, default: float) -> float:
            past = [
                o.minutes
                for o in history.outcomes
                if o.decision.lever is lever and (method is None or o.decision.method == method)
            ]
            return sum(past) / len(past) if past else default

        return {
            "harness": mean(Lever.harness, None, s.harness_minutes),
            "sft": mean(Lever.weights, "sft", s.sft_minutes),
            "grpo": mean(Lever.weights, "grpo", s.grpo_minutes),
        }

    def _lever_minutes(self, costs: dict[str, float]) -> dict[Lever, float]:
        out = {Lever.harness: costs["harness"]} if self.settings.harness_enabled else {}
        if self.settings.weights_enabled:
            out[Lever.weights] = min(costs["sft"], costs["grpo"])
        return out

    def decide_before_rollout(
        self, history: History, budget: Budget, *, run_id: str, generation: int
    ) -> Decision | None:
        """A stop Decision when the budget alone rules out every lever, else None.

        Asked before the generation's rollout, so that a spent budget does not pay for a train
        batch (about two minutes of LawBench on a CPU) only to stop after it.
        """
        costs = self._minutes(history)
        if (chosen := self._budget_stop(budget, costs)) is None:
            return None
        return Decision(
            run_id=run_id,
            generation=generation,
            lever=chosen.lever,
            rationale=f"{chosen.why} Decided before the rollout: no trajectory was needed.",
            evidence={"rule": chosen.rule, "chosen_by": "stop", "minutes_estimate": costs},
        )

    def _budget_stop(self, budget: Budget, costs: dict[str, float]) -> _Proposal | None:
        lever, cheapest = min(self._lever_minutes(costs).items(), key=lambda kv: kv[1])
        if budget.generations_left is not None and budget.generations_left <= 0:
            return _stop("no_generations", "no generation is left in the budget.")
        if budget.minutes_left < cheapest:
            return _stop(
                "budget",
                f"{budget.minutes_left:.1f} min left cannot fit the cheapest lever "
                f"({lever}, about {cheapest:.1f} min).",
            )
        return None

    def _stop(self, ev: Evidence, budget: Budget, costs: dict[str, float]) -> _Proposal | None:
        s = self.settings
        if (spent := self._budget_stop(budget, costs)) is not None:
            return spent
        if ev.accuracy >= s.solved_accuracy:
            return _stop(
                "solved",
                f"the batch is solved: accuracy {ev.accuracy:.1%} on {ev.n} trajectories "
                f"(threshold {s.solved_accuracy:.0%}).",
            )
        if ev.rejection_streak >= s.max_rejections:
            return _stop(
                "stalled",
                f"the last {ev.rejection_streak} candidates (both levers) were all rejected "
                f"on val (limit {s.max_rejections}).",
            )
        return None

    # -- proposals ----------------------------------------------------------------------------

    def _harness(self, ev: Evidence) -> _Proposal | None:
        """The harness rule that addresses most of the batch, or None when none fires."""
        s, f = self.settings, ev.failures
        fired = []
        if ev.format_share > 0 and ev.format_share >= s.format_share:
            why = (
                f"Harness, focus format: {ev.format_share:.0%} of {ev.n} outputs are not a valid "
                f"answer ({f[FailureClass.invalid_label]} labels outside the option set, "
                f"{f[FailureClass.unparsable]} unparsable), at or above the "
                f"{s.format_share:.0%} threshold."
            )
            fired.append(("format_failures", Focus.format, why, ev.format_share))
        absent = ev.absent_share
        if absent is not None and ev.n_ranked_wrong >= s.min_wrong and absent >= s.absent_share:
            k = round(absent * ev.n_ranked_wrong)
            why = (
                f"Harness, focus shortlist: gold is absent from the shortlist in {absent:.0%} of "
                f"the {ev.n_ranked_wrong} wrong answers with a ranking ({k} items), at or above "
                f"{s.absent_share:.0%}; no adapter can pick an option that was never scored."
            )
            fired.append(("gold_absent", Focus.shortlist, why, k / ev.n))
        fired += self._prior_rules(ev)
        if ev.error_share > 0 and ev.error_share >= s.error_share:
            why = (
                f"Harness, focus format: {ev.error_share:.0%} of {ev.n} rollouts failed "
                f"({f[FailureClass.timeout]} timeouts, {f[FailureClass.crash]} crashes, "
                f"{f[FailureClass.other_error]} other errors), at or above {s.error_share:.0%}."
            )
            fired.append(("rollout_errors", Focus.format, why, ev.error_share))
        if not fired:
            return None
        rule, focus, why, share = max(fired, key=lambda r: r[3])
        settings: dict[str, Any] = {"focus": focus.value}
        if rule == "unused_prior":
            settings["hint"] = "prior_up"
            settings["prior_gap"] = share
        return _Proposal(
            lever=Lever.harness,
            rule=rule,
            why=why,
            addressable=share,
            settings=settings,
            focus=focus.value,
        )

    def _prior_rules(self, ev: Evidence) -> list[tuple[str, Focus, str, float]]:
        """The harness's prior against its answer: unused (scoring) or binding (shortlist)."""
        s, p = self.settings, ev.prior
        if p is None or p.n < s.min_wrong:
            return []
        gap = p.accuracy - p.answer_accuracy
        if gap >= s.prior_gap:
            why = (
                f"Harness, focus scoring: the harness's own prior ranks gold first in "
                f"{p.accuracy:.0%} of {p.n} items, its answer is right in {p.answer_accuracy:.0%} "
                f"(gap {gap:.0%}, threshold {s.prior_gap:.0%}): the scoring leaves that signal "
                f"unused."
            )
            return [("unused_prior", Focus.scoring, why, gap)]
        if p.agreement >= s.prior_agreement and p.answer_accuracy < s.solved_accuracy:
            why = (
                f"Harness, focus shortlist: the answer follows the prior's top option in "
                f"{p.agreement:.0%} of {p.n} items (threshold {s.prior_agreement:.0%}) and is "
                f"right in {p.answer_accuracy:.0%}, no better than the prior "
                f"({p.accuracy:.0%}): the prior and its shortlist bound the answer."
            )
            return [("prior_bound", Focus.shortlist, why, 1.0 - p.accuracy)]
        return []

    def _weights(self, ev: Evidence, budget: Budget, costs: dict[str, float]) -> _Proposal | None:
        """A learnable pattern among wrong answers: either signal suffices, as both say the
        policy already leans towards a consistent answer that training can shift."""
        s = self.settings
        n_wrong = ev.failures[FailureClass.wrong_valid]
        near, rep = ev.near_miss_share, ev.repeated_confusion_share
        near_ok = (
            near is not None and ev.n_ranked_wrong >= s.min_wrong and near >= s.near_miss_share
        )
        rep_ok = rep is not None and n_wrong >= s.min_wrong and rep >= s.confusion_share
        if not (near_ok or rep_ok):
            return None
        signals, items = [], 0.0
        if near_ok and near is not None:
            signals.append(
                f"gold is ranked 2-{s.near_k} in {near:.0%} of the {ev.n_ranked_wrong} wrong "
                f"answers with a ranking (threshold {s.near_miss_share:.0%})"
            )
            items = near * ev.n_ranked_wrong
        if rep_ok and rep is not None:
            top = ev.confusions[0]
            signals.append(
                f"{rep:.0%} of the {n_wrong} valid-but-wrong answers fall in confusion pairs "
                f"repeated across instances, led by {top.gold} -> {top.predicted} "
                f"x{top.count} (threshold {s.confusion_share:.0%})"
            )
            items = max(items, rep * n_wrong)
        method, method_why, settings = self._method(ev, budget, costs)
        return _Proposal(
            lever=Lever.weights,
            rule="learnable_pattern",
            why=f"Weights ({method}): a learnable pattern: {'; '.join(signals)}. {method_why}",
            addressable=items / ev.n,
            method=method,
            settings=settings,
            focus="near_miss" if near_ok else "confusions",
        )

    def _method(
        self, ev: Evidence, budget: Budget, costs: dict[str, float]
    ) -> tuple[str, str, dict[str, Any]]:
        s, g = self.settings, ev.groups
        sft = dict(s.sft_settings)
        if g.n_groups == 0:
            return "sft", "SFT: one sample per instance, so GRPO has no group to compare.", sft
        share = g.share_with_variance
        if g.n_groups < s.grpo_min_groups or share < s.grpo_variance_share:
            why = (
                f"SFT: {share:.0%} of {g.n_groups} sampled groups have reward variance (GRPO "
                f"needs {s.grpo_variance_share:.0%} of at least {s.grpo_min_groups} groups)."
            )
            return "sft", why, sft
        if costs["grpo"] > budget.minutes_left:
            why = (
                f"SFT: {share:.0%} of sampled groups have reward variance, but GRPO (about "
                f"{costs['grpo']:.0f} min) does not fit the {budget.minutes_left:.0f} min left."
            )
            return "sft", why, sft
        why = (
            f"GRPO: {share:.0%} of {g.n_groups} sampled groups of up to {g.group_size} have "
            f"reward variance (mean {g.mean_variance:.3f}), at or above "
            f"{s.grpo_variance_share:.0%}."
        )
        return "grpo", why, {**s.grpo_settings, "group_size": g.group_size}

    def _fallback(
        self, lever: Lever, ev: Evidence, budget: Budget, costs: dict[str, float]
    ) -> _Proposal:
        """A lever's proposal when none of its rules fired: said plainly, ranked below support."""
        s = self.settings
        if lever is Lever.harness:
            near = ev.near_miss_share
            focus = (
                Focus.scoring if near is not None and near >= s.near_miss_share else Focus.examples
            )
            why = (
                f"Harness, focus {focus}: no harness rule fired ({ev.format_share:.0%} format "
                f"failures, {ev.error_share:.0%} rollout errors, gold absent in "
                f"{_pct(ev.absent_share)} of ranked wrong answers)."
            )
            return _Proposal(
                lever=lever,
                rule="fallback_harness",
                why=why,
                supported=False,
                addressable=1.0 - ev.accuracy,
                settings={"focus": focus.value},
                focus=focus.value,
            )
        method, method_why, settings = self._method(ev, budget, costs)
        why = (
            f"Weights ({method}): no learnable pattern stood out ({ev.wrong_valid_share:.0%} "
            f"valid-but-wrong answers, {_pct(ev.repeated_confusion_share)} in repeated "
            f"confusions, near misses {_pct(ev.near_miss_share)}). {method_why}"
        )
        return _Proposal(
            lever=lever,
            rule="fallback_weights",
            why=why,
            supported=False,
            addressable=ev.wrong_valid_share,
            method=method,
            settings=settings,
            focus="gold",
        )

    # -- choice -------------------------------------------------------------------------------

    def _explorable(
        self, lever: Lever, ev: Evidence, budget: Budget, costs: dict[str, float]
    ) -> bool:
        s = self.settings
        minutes = self._lever_minutes(costs)[lever]
        return (
            s.explore_untried
            and ev.levers[lever].attempts == 0
            and minutes <= s.explore_share * budget.minutes_left
        )

    def _key(
        self, p: _Proposal, ev: Evidence, budget: Budget, costs: dict[str, float]
    ) -> tuple[bool, bool, bool, float, float, int]:
        s, stats = self.settings, ev.levers[p.lever]
        return (
            stats.trailing_rejections >= s.lever_patience,
            not p.supported,
            not self._explorable(p.lever, ev, budget, costs),
            -(stats.gain_per_minute or 0.0),
            -p.addressable,
            _LEVER_ORDER.index(p.lever),
        )

    def _choose(
        self, ev: Evidence, budget: Budget, costs: dict[str, float]
    ) -> tuple[_Proposal, str, str]:
        feasible = [
            lever
            for lever, minutes in self._lever_minutes(costs).items()
            if minutes <= budget.minutes_left
        ]
        proposals = []
        for lever in feasible:
            if lever is Lever.harness:
                specific = self._harness(ev)
            else:
                specific = self._weights(ev, budget, costs)
            proposals.append(specific or self._fallback(lever, ev, budget, costs))
        proposals.sort(key=lambda p: self._key(p, ev, budget, costs))
        best = proposals[0]
        if len(proposals) == 1:
            return best, "only_feasible", self._why_alone(best, budget, costs)
        other = proposals[1]
        bk, ok = self._key(best, ev, budget, costs), self._key(other, ev, budget, costs)
        at = next(i for i, (b, o) in enumerate(zip(bk, ok, strict=True)) if b != o)
        return best, _CHOICE_REASONS[at], self._why_over(at, best, other, ev)

    def _why_alone(self, best: _Proposal, budget: Budget, costs: dict[str, float]) -> str:
        if best.lever is Lever.weights and not self.settings.harness_enabled:
            return "The harness lever is off for this run."
        if best.lever is Lever.weights:
            return (
                f"The harness (about {costs['harness']:.0f} min) does not fit the "
                f"{budget.minutes_left:.0f} min left."
            )
        if not self.settings.weights_enabled:
            return "The weights lever is off for this run."
        return (
            f"The weights lever (about {min(costs['sft'], costs['grpo']):.0f} min) does not fit "
            f"the {budget.minutes_left:.0f} min left."
        )

    def _why_over(self, at: int, best: _Proposal, other: _Proposal, ev: Evidence) -> str:
        b, o = ev.levers[best.lever], ev.levers[other.lever]
        peer = "both supported" if other.supported else "no rule fired for either"
        if at == 0:
            return (
                f"Chosen over {other.lever}: its last {o.trailing_rejections} candidates were "
                f"all rejected on val (patience {self.settings.lever_patience})."
            )
        if at == 1:
            return f"Chosen over {other.lever}, for which no rule fired."
        if at == 2:
            return f"Chosen over {other.lever} ({peer}) to explore an untried lever."
        if at == 3:
            return (
                f"Chosen over {other.lever} ({peer}) for its higher val gain per minute so far "
                f"({b.gain_per_minute or 0.0:.4f} vs {o.gain_per_minute or 0.0:.4f})."
            )
        if at == 4:
            return (
                f"Chosen over {other.lever} ({peer}): it addresses more of the batch "
                f"({best.addressable:.0%} vs {other.addressable:.0%})."
            )
        return f"Chosen over {other.lever} on a full tie ({peer}): the harness is cheaper."
