"""The offline Feedback-Agent: reads one generation's trajectories and the run's history and decides
which lever to pull next (harness, weights, or stop) and how.

`OfflineFeedbackAgent` is the rule- and statistics-based default that CI runs; it implements the
`FeedbackAgent` Protocol of `agents/base.py` (an LLM-backed agent implements the same one). It
knows no task: the metric, the harness's signals and knob families, the levers and the samples
per instance come from the `FeedbackContext`. It rests on evidence, not on a schedule, in three
steps; every step cites its numbers in the rationale:

1. Stop when no generation is left, when no lever is enabled, when the minutes left cannot fit
   the cheapest enabled lever, when the batch is solved (only where the task defines
   correctness: accuracy at or above `solved_accuracy`), or after `max_rejections` consecutive
   rejected candidates (both levers). The budget stops need no trajectory:
   `decide_before_rollout` applies them before the loop pays for the generation's rollout.
2. Each enabled lever that fits the budget gets a proposal (`agents/rules.py`: the harness rules,
   the weights rule and the method, the fallbacks). The weights lever gets none when the batch
   made no policy call (tokens per item 0: a program that never asks the model); if it was the
   only lever left, the run stops (rule `policy_unused`).
3. Choose, in this order: a lever whose last `lever_patience` candidates were all rejected loses
   to one that was not; a supported lever beats a fallback; an untried lever is explored (while
   one attempt of it costs at most `explore_share` of the minutes left); the higher val gain per
   minute in history wins (`Outcome.val_gain`, oriented: lower-is-better metrics need nothing
   else); between two supported proposals the one that addresses more of the batch wins;
   between two fallbacks, whose `addressable` is never measured and never compared, the lever
   with fewer attempts so far wins (explore the less-tried one); then the harness (the cheaper
   lever) wins. `chosen_by` names the step that decided and the rationale says it.

Guaranteed: no reward variance within sampled groups never yields GRPO; a Decision's `evidence`
holds the full `Evidence` dump plus `rule`, `chosen_by`, `focus` and the minute estimates (a stop
decided before the rollout holds only `rule`, `chosen_by` and the estimates). `settings` holds,
for the harness, `{"focus": family or None, "raise": knob, "gap": float}` (`raise` and `gap`
only when an alternative signal's rule set them); for weights only trainer settings (the
configured `sft_settings` / `grpo_settings`, plus `group_size` for GRPO), so the trainer can
validate them as they are.
Not guaranteed: the thresholds are defaults, not tuned optima; minute estimates before a lever
has history are the settings' guesses.
"""

from __future__ import annotations

from collections.abc import Sequence

from sialoop.agents.base import Budget, FeedbackAgent, FeedbackContext, History, Outcome
from sialoop.agents.evidence import Evidence, compute_evidence
from sialoop.agents.rules import (
    LeverProposal,
    OfflineFeedbackSettings,
    fallback,
    harness_rule,
    weights_rule,
)
from sialoop.records import Decision, Lever, Trajectory

__all__ = [
    "Budget",
    "FeedbackAgent",
    "FeedbackContext",
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
    "fewer_attempts",
    "tie",
)

_Key = tuple[bool, bool, bool, float, float, int, int]


def _stop(rule: str, why: str) -> LeverProposal:
    return LeverProposal(lever=Lever.stop, rule=rule, why=f"Stop: {why}")


_POLICY_UNUSED = (
    "the harness made no policy calls on this batch (0 tokens per item), so new weights could "
    "not change its outputs and there is nothing to train on; a harness that asks the policy "
    "(for a program task, the task's generator template) gives the weights lever work."
)


def _policy_unused(ev: Evidence) -> bool:
    """Every trajectory of the batch is known to have made no LLM call."""
    return ev.tokens_per_item == 0


def _levers(context: FeedbackContext) -> list[Lever]:
    """The enabled trainable levers; an unknown name is an error, not ignored."""
    out = []
    for name in context.levers:
        lever = Lever(name)
        if lever not in _LEVER_ORDER:
            raise ValueError(f"context.levers may name harness and weights only, got {name!r}")
        out.append(lever)
    return out


def _batch_line(ev: Evidence, budget: Budget) -> str:
    d = ev.scores
    parts = [f"Batch: {ev.n} trajectories on {ev.n_instances} instances"]
    if ev.accuracy is not None:
        parts.append(f"accuracy {ev.accuracy:.0%}")
    if d.raw_mean is not None:
        parts.append(
            f"mean {ev.metric} {d.raw_mean:.4g} (best {d.raw_best:.4g}, worst "
            f"{d.raw_worst:.4g}; {ev.direction} is better)"
        )
    return ", ".join(parts) + f"; {budget.minutes_left:.0f} min left."


class OfflineFeedbackAgent:
    """Rules over `Evidence`; see the module docstring for the order they apply in."""

    def __init__(self, settings: OfflineFeedbackSettings | None = None) -> None:
        self.settings = settings or OfflineFeedbackSettings()

    def decide_before_rollout(
        self,
        history: History,
        budget: Budget,
        context: FeedbackContext,
        *,
        run_id: str,
        generation: int,
    ) -> Decision | None:
        """A stop Decision when the budget alone rules out every lever, else None.

        Asked before the generation's rollout, so that a spent budget does not pay for a train
        batch only to stop after it.
        """
        costs = self._minutes(history)
        if (chosen := self._budget_stop(budget, costs, context)) is None:
            return None
        return Decision(
            run_id=run_id,
            generation=generation,
            lever=chosen.lever,
            rationale=f"{chosen.why} Decided before the rollout: no trajectory was needed.",
            evidence={"rule": chosen.rule, "chosen_by": "stop", "minutes_estimate": costs},
        )

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
        if not trajectories:
            raise ValueError("the Feedback-Agent needs this generation's trajectories; got none")
        s = self.settings
        ev = compute_evidence(trajectories, context, history.outcomes, near_k=s.near_k, top=s.top)
        costs = self._minutes(history)
        chosen, chosen_by, why_over = self._stop(ev, budget, costs, context), "stop", ""
        if chosen is None:
            chosen, chosen_by, why_over = self._choose(ev, history, budget, costs, context)
        return Decision(
            run_id=run_id,
            generation=generation,
            lever=chosen.lever,
            rationale=" ".join(p for p in (chosen.why, why_over, _batch_line(ev, budget)) if p),
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
        """Expected minutes per attempt: the mean of this run's past attempts, else the
        configured guess. A weights method without history is scaled from the other one's
        measured minutes by the ratio of their guesses (the machine's speed is the same)."""
        s = self.settings

        def mean(lever: Lever, method: str | None) -> float | None:
            past = [
                o.minutes
                for o in history.outcomes
                if o.decision.lever is lever and (method is None or o.decision.method == method)
            ]
            return sum(past) / len(past) if past else None

        sft, grpo = mean(Lever.weights, "sft"), mean(Lever.weights, "grpo")
        if sft is None and grpo is not None:
            sft = grpo * s.sft_minutes / s.grpo_minutes
        if grpo is None and sft is not None:
            grpo = sft * s.grpo_minutes / s.sft_minutes
        harness, ppo = mean(Lever.harness, None), mean(Lever.weights, "ppo")
        grpo_guess = s.grpo_minutes if grpo is None else grpo
        return {
            "harness": s.harness_minutes if harness is None else harness,
            "sft": s.sft_minutes if sft is None else sft,
            "grpo": grpo_guess,
            "ppo": grpo_guess if ppo is None else ppo,  # both sample-based: GRPO's guess
        }

    def _lever_minutes(
        self, costs: dict[str, float], context: FeedbackContext
    ) -> dict[Lever, float]:
        per = {Lever.harness: costs["harness"], Lever.weights: min(costs["sft"], costs["grpo"])}
        return {lever: per[lever] for lever in _levers(context)}

    def _budget_stop(
        self, budget: Budget, costs: dict[str, float], context: FeedbackContext
    ) -> LeverProposal | None:
        if budget.generations_left is not None and budget.generations_left <= 0:
            return _stop("no_generations", "no generation is left in the budget.")
        minutes = self._lever_minutes(costs, context)
        if not minutes:
            return _stop("no_levers", "no lever is enabled for this run.")
        lever, cheapest = min(minutes.items(), key=lambda kv: kv[1])
        if budget.minutes_left < cheapest:
            return _stop(
                "budget",
                f"{budget.minutes_left:.1f} min left cannot fit the cheapest lever "
                f"({lever}, about {cheapest:.1f} min).",
            )
        return None

    def _stop(
        self, ev: Evidence, budget: Budget, costs: dict[str, float], context: FeedbackContext
    ) -> LeverProposal | None:
        s = self.settings
        if (spent := self._budget_stop(budget, costs, context)) is not None:
            return spent
        if ev.accuracy is not None and ev.accuracy >= s.solved_accuracy:
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

    # -- choice -------------------------------------------------------------------------------

    def _key(
        self, p: LeverProposal, ev: Evidence, budget: Budget, minutes: dict[Lever, float]
    ) -> _Key:
        """Smaller wins; one entry per `_CHOICE_REASONS` step. A fallback's `addressable` is
        left out (0), and attempts count only between fallbacks."""
        s, stats = self.settings, ev.levers[p.lever]
        explorable = (
            s.explore_untried
            and stats.attempts == 0
            and minutes[p.lever] <= s.explore_share * budget.minutes_left
        )
        return (
            stats.trailing_rejections >= s.lever_patience,
            not p.supported,
            not explorable,
            -(stats.gain_per_minute or 0.0),
            -(p.addressable or 0.0) if p.supported else 0.0,
            0 if p.supported else stats.attempts,
            _LEVER_ORDER.index(p.lever),
        )

    def _choose(
        self,
        ev: Evidence,
        history: History,
        budget: Budget,
        costs: dict[str, float],
        context: FeedbackContext,
    ) -> tuple[LeverProposal, str, str]:
        s, minutes = self.settings, self._lever_minutes(costs, context)
        proposals = []
        for lever, m in minutes.items():
            if m > budget.minutes_left or (lever is Lever.weights and _policy_unused(ev)):
                continue
            if lever is Lever.harness:
                specific = harness_rule(ev, context, s)
            else:
                specific = weights_rule(ev, budget, costs, s, history)
            proposals.append(specific or fallback(lever, ev, context, history, budget, costs, s))
        if not proposals:  # only weights was left, and the harness never calls the policy
            return _stop("policy_unused", _POLICY_UNUSED), "stop", ""
        proposals.sort(key=lambda p: self._key(p, ev, budget, minutes))
        best = proposals[0]
        if len(proposals) == 1:
            why = self._why_alone(best, ev, budget, minutes, context.unavailable)
            return best, "only_feasible", why
        other = proposals[1]
        bk, ok = self._key(best, ev, budget, minutes), self._key(other, ev, budget, minutes)
        at = next(i for i, (b, o) in enumerate(zip(bk, ok, strict=True)) if b != o)
        return best, _CHOICE_REASONS[at], self._why_over(at, best, other, ev)

    def _why_alone(
        self,
        best: LeverProposal,
        ev: Evidence,
        budget: Budget,
        minutes: dict[Lever, float],
        context_off: dict[str, str],
    ) -> str:
        other = Lever.weights if best.lever is Lever.harness else Lever.harness
        if other not in minutes:
            why = context_off.get(other.value)
            return f"The {other} lever is off for this run" + (f": {why}." if why else ".")
        if other is Lever.weights and _policy_unused(ev):
            return f"The weights lever is left out: {_POLICY_UNUSED}"
        return (
            f"The {other} lever (about {minutes[other]:.0f} min) does not fit the "
            f"{budget.minutes_left:.0f} min left."
        )

    def _why_over(self, at: int, best: LeverProposal, other: LeverProposal, ev: Evidence) -> str:
        b, o = ev.levers[best.lever], ev.levers[other.lever]
        peer = "both supported" if other.supported else "no rule fired for either"
        reasons = {
            0: (
                f"its last {o.trailing_rejections} candidates were all rejected on val "
                f"(patience {self.settings.lever_patience})"
            ),
            1: "for which no rule fired",
            2: f"{peer}, to explore an untried lever",
            3: (
                f"{peer}, for its higher val gain per minute so far "
                f"({b.gain_per_minute or 0.0:.4f} vs {o.gain_per_minute or 0.0:.4f})"
            ),
            4: (
                f"{peer}: it addresses more of the batch "
                f"({best.addressable or 0.0:.0%} vs {other.addressable or 0.0:.0%})"
            ),
            5: (
                f"{peer}: it was tried less so far ({b.attempts} vs {o.attempts} attempts), "
                f"so it is explored first"
            ),
        }
        default = f"{peer}, on a full tie: the harness is the cheaper lever"
        return f"Chosen over {other.lever} ({reasons.get(at, default)})."
