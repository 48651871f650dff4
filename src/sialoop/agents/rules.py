"""The offline Feedback-Agent's rules: one proposal per lever from `Evidence` and the harness's
declarations (`agents/feedback.py` stops, then chooses between these proposals).

Harness rules; the one that addresses the largest share of the batch wins, and on equal shares
the first in this order (alternatives in declaration order):
- `format_failures` (answers outside the option set or unparsable): focus the declared knob
  family named "format" if the harness has one, else None (the Meta-Agent searches the whole
  space);
- `gold_absent`: gold missing from a `ranking` signal's candidates: focus that signal's family;
- `alternative_beats_answer`: an `alternative` signal right more often than the answer by
  `prior_gap` or more: focus the signal's family, `raise` the knob it names, `gap` the gap;
- `answer_bound_by_alternative`: the answer follows an alternative in `prior_agreement` of items
  or more and is no better than it (by less than `prior_gap`): focus the signal's
  `bound_family`;
- `rollout_errors` (timeouts, crashes, other errors): focus as for format failures;
- `answer_is_alternative` (cost): the answer equals an alternative in `cost_agreement` of items
  or more, and the harness declares a knob family named "cost" (knobs that cut its own cost:
  fewer model calls, shorter prompts): focus it. Its share is the agreement (the items whose
  model work changed nothing), so it leads; the gate accepts the result only as "cheaper",
  non-inferior and clearly faster, or as better.
Weights rule `learnable_pattern`: near misses in a ranking signal, or confusions repeated across
instances. Method: GRPO when sampled groups show reward variance and GRPO fits the budget, else
SFT. A lever with no firing rule gets a fallback proposal that says so; its `addressable` is
None (a fallback's share of the batch is not measured, and never decides a choice). The harness
fallback focuses the family of a ranking signal with near misses; else, once as many harness
candidates in a row as there are declared families were rejected, the whole space (None) every
other generation; else, of the families none of the last `recent_focus` harness decisions
focused, one never focused (declaration order) or the one focused longest ago; else None.

Harness `settings`: `{"focus": str | None, "raise": str, "gap": float}`, the last two only when
an alternative's rule set them. Weights `settings`: only trainer settings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from sialoop.agents.base import Budget, FeedbackContext, History
from sialoop.agents.evidence import Evidence, FailureClass, RankHistogram
from sialoop.records import Lever


class OfflineFeedbackSettings(BaseModel):
    """Thresholds of the offline agent. Shares are fractions in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Harness rules.
    format_share: float = Field(default=0.15, ge=0, le=1)  # invalid + unparsable, of the batch
    error_share: float = Field(default=0.10, ge=0, le=1)  # timeouts, crashes, other errors
    absent_share: float = Field(default=0.30, ge=0, le=1)  # of ranked wrong: gold not a candidate
    # An alternative signal right this much more often than the answer: unused.
    prior_gap: float = Field(default=0.05, gt=0, le=1)
    # The answer follows an alternative this often (and gains nothing on it): bound by it.
    prior_agreement: float = Field(default=0.85, gt=0, le=1)
    # The answer is the alternative this often: the model work on top changes almost nothing.
    cost_agreement: float = Field(default=0.95, gt=0, le=1)
    # Harness fallback: families focused by this many last harness decisions are skipped.
    recent_focus: int = Field(default=2, ge=1)
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
    dpo_settings: dict[str, Any] = Field(default_factory=dict)
    # DPO once SFT has not paid on this run and this share of the batch answered valid but wrong
    # (each a hard negative to pair with gold).
    dpo_wrong_share: float = Field(default=0.2, ge=0, le=1)
    # PPO learns from sampled tokens: this share of the batch's episodes must sample, and their
    # rewards must differ. Its value baseline stands in for GRPO's group mean when k = 1.
    ppo_sampling_share: float = Field(default=0.5, gt=0, le=1)
    ppo_settings: dict[str, Any] = Field(default_factory=dict)
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


class LeverProposal(BaseModel):
    """One lever's case: the rule that fired (or the fallback), why, and what to do."""

    model_config = ConfigDict(frozen=True)

    lever: Lever
    rule: str
    why: str
    supported: bool = True  # False: a fallback, no rule fired for this lever
    addressable: float | None = None  # share of the batch the fix could turn; None: a fallback
    method: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)  # harness: focus; weights: trainer's
    focus: str | None = None  # what the evidence points at, kept in the Decision's evidence


COST_FAMILY = "cost"  # the knob family a harness declares for moves that cut its own cost


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _named(focus: str | None) -> str:
    return f"focus {focus}" if focus is not None else "no focus (the whole knob space)"


def _harness_settings(focus: str | None, raise_: str | None, gap: float | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"focus": focus}
    if raise_ is not None:
        settings["raise"] = raise_
    if gap is not None:
        settings["gap"] = gap
    return settings


class _Fired(NamedTuple):
    rule: str
    focus: str | None
    why: str
    share: float  # of the batch: the rule with the largest share wins
    raise_: str | None = None
    gap: float | None = None


def _format_focus(ctx: FeedbackContext) -> str | None:
    return "format" if "format" in ctx.declarations.families else None


def _format_rule(ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings) -> list[_Fired]:
    f, focus, fmt = ev.failures, _format_focus(ctx), ev.format_share or 0.0
    if fmt == 0 or fmt < s.format_share:
        return []
    why = (
        f"Harness, {_named(focus)}: {fmt:.0%} of {ev.n} outputs are not a valid answer "
        f"({f[FailureClass.invalid_label]} answers outside the option set, "
        f"{f[FailureClass.unparsable]} unparsable or refused by the task's check), at or above "
        f"the {s.format_share:.0%} threshold."
    )
    return [_Fired("format_failures", focus, why, fmt)]


def _error_rule(ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings) -> list[_Fired]:
    f, focus, err = ev.failures, _format_focus(ctx), ev.error_share or 0.0
    if err == 0 or err < s.error_share:
        return []
    why = (
        f"Harness, {_named(focus)}: {err:.0%} of {ev.n} rollouts failed "
        f"({f[FailureClass.timeout]} timeouts, {f[FailureClass.crash]} crashes, "
        f"{f[FailureClass.other_error]} other errors), at or above {s.error_share:.0%}."
    )
    return [_Fired("rollout_errors", focus, why, err)]


def _absent_rules(ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings) -> list[_Fired]:
    fired = []
    for name, r in ev.rankings.items():
        absent = r.absent_share
        if absent is None or r.n_wrong < s.min_wrong or absent < s.absent_share:
            continue
        focus, k = ctx.declarations.signals[name].family, round(absent * r.n_wrong)
        why = (
            f"Harness, {_named(focus)}: gold is absent from the candidates of signal {name!r} "
            f"in {absent:.0%} of the {r.n_wrong} wrong answers carrying it ({k} items), at or "
            f"above {s.absent_share:.0%}; no adapter can pick a candidate that was never there."
        )
        fired.append(_Fired("gold_absent", focus, why, k / ev.n))
    return fired


def _alternative_rules(
    ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings
) -> list[_Fired]:
    fired = []
    for name, a in ev.alternatives.items():
        if a.n < s.min_wrong:
            continue
        spec = ctx.declarations.signals[name]
        if a.gap >= s.prior_gap:
            raised = f"; raise {spec.raises}" if spec.raises else ""
            why = (
                f"Harness, {_named(spec.family)}: the alternative answer {name!r} is right on "
                f"{a.accuracy:.0%} of {a.n} items, the answer on {a.answer_accuracy:.0%} (gap "
                f"{a.gap:.0%}, threshold {s.prior_gap:.0%}; it is right where the answer is "
                f"wrong on {a.beats:.0%}, the reverse on {a.loses:.0%}): the harness leaves "
                f"that signal unused{raised}."
            )
            rule = "alternative_beats_answer"
            fired.append(_Fired(rule, spec.family, why, a.gap, spec.raises, a.gap))
        elif (
            a.agreement >= s.prior_agreement
            and a.answer_accuracy < s.solved_accuracy
            and a.answer_accuracy - a.accuracy < s.prior_gap
        ):
            why = (
                f"Harness, {_named(spec.bound_family)}: the answer follows the alternative "
                f"{name!r} on {a.agreement:.0%} of {a.n} items (threshold "
                f"{s.prior_agreement:.0%}) and is right on {a.answer_accuracy:.0%}, no better "
                f"than it ({a.accuracy:.0%}): the alternative bounds the answer."
            )
            rule = "answer_bound_by_alternative"
            fired.append(_Fired(rule, spec.bound_family, why, 1.0 - a.accuracy))
    return fired


def _cost_rules(ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings) -> list[_Fired]:
    if COST_FAMILY not in ctx.declarations.families:
        return []
    fired = []
    for name, a in ev.alternatives.items():
        if a.n < s.min_wrong or a.agreement < s.cost_agreement:
            continue
        why = (
            f"Harness, {_named(COST_FAMILY)}: the answer is the alternative {name!r} on "
            f"{a.agreement:.0%} of {a.n} items (threshold {s.cost_agreement:.0%}), so the work "
            f"done on top of it changes almost nothing: cut it where the score holds."
        )
        fired.append(_Fired("answer_is_alternative", COST_FAMILY, why, a.agreement))
    return fired


def harness_rule(
    ev: Evidence, ctx: FeedbackContext, s: OfflineFeedbackSettings
) -> LeverProposal | None:
    """The harness rule that addresses most of the batch, or None when none fires (on a tie,
    the first in the module docstring's order)."""
    fired = [*_format_rule(ev, ctx, s), *_absent_rules(ev, ctx, s)]
    fired += [*_alternative_rules(ev, ctx, s), *_error_rule(ev, ctx, s), *_cost_rules(ev, ctx, s)]
    if not fired:
        return None
    best = max(fired, key=lambda r: r.share)
    return LeverProposal(
        lever=Lever.harness,
        rule=best.rule,
        why=best.why,
        addressable=best.share,
        settings=_harness_settings(best.focus, best.raise_, best.gap),
        focus=best.focus,
    )


def _near_misses(ev: Evidence, s: OfflineFeedbackSettings) -> RankHistogram | None:
    """The ranking signal with the largest share of near misses at or above the threshold."""
    ok = [
        r
        for r in ev.rankings.values()
        if r.near_miss_share is not None
        and r.n_wrong >= s.min_wrong
        and r.near_miss_share >= s.near_miss_share
    ]
    return max(ok, key=lambda r: r.near_miss_share or 0.0, default=None)


def weights_rule(
    ev: Evidence,
    budget: Budget,
    costs: dict[str, float],
    s: OfflineFeedbackSettings,
    history: History | None = None,
) -> LeverProposal | None:
    """A learnable pattern among wrong answers: either signal suffices, as both say the policy
    already leans towards a consistent answer that training can shift."""
    n_wrong = ev.failures[FailureClass.wrong_valid]
    near, rep = _near_misses(ev, s), ev.repeated_confusion_share
    rep_ok = rep is not None and n_wrong >= s.min_wrong and rep >= s.confusion_share
    if near is None and not rep_ok:
        return None
    signals, items = [], 0.0
    if near is not None and near.near_miss_share is not None:
        signals.append(
            f"gold is ranked 2-{s.near_k} by signal {near.signal!r} in "
            f"{near.near_miss_share:.0%} of the {near.n_wrong} wrong answers carrying it "
            f"(threshold {s.near_miss_share:.0%})"
        )
        items = near.near_miss_share * near.n_wrong
    if rep_ok and rep is not None:
        top = ev.confusions[0]
        signals.append(
            f"{rep:.0%} of the {n_wrong} valid-but-wrong answers fall in confusion pairs "
            f"repeated across instances, led by {top.gold} -> {top.predicted} x{top.count} "
            f"(threshold {s.confusion_share:.0%})"
        )
        items = max(items, rep * n_wrong)
    method, method_why, settings = method_for(ev, budget, costs, s, history)
    return LeverProposal(
        lever=Lever.weights,
        rule="learnable_pattern",
        why=f"Weights ({method}): a learnable pattern: {'; '.join(signals)}. {method_why}",
        addressable=items / ev.n,
        method=method,
        settings=settings,
        focus="near_miss" if near is not None else "confusions",
    )


def _gains(history: History | None) -> dict[str, list[float]]:
    """The oriented val gains of this run's weights candidates, by method (None: not scored,
    counted as no gain)."""
    out: dict[str, list[float]] = {}
    for o in history.outcomes if history is not None else ():
        if o.decision.lever is Lever.weights and o.decision.method:
            out.setdefault(o.decision.method, []).append(o.val_gain or 0.0)
    return out


def _sampling(ev: Evidence, s: OfflineFeedbackSettings) -> str | None:
    """Why the harness's episodes suit PPO (they sample tokens whose rewards differ), or None."""
    e = ev.episodes
    if e.sampling_share is None or e.sampling_share < s.ppo_sampling_share:
        return None
    if not e.reward_std:
        return None
    calls = f", {e.mean_calls:.1f} calls per episode" if e.mean_calls else ""
    return (
        f"{e.sampling_share:.0%} of {e.n} episodes sample tokens (about "
        f"{e.mean_sampled_tokens or 0:.0f} per episode{calls}) and their rewards differ "
        f"(std {e.reward_std:.3g})"
    )


def _without_groups(
    ev: Evidence,
    budget: Budget,
    costs: dict[str, float],
    s: OfflineFeedbackSettings,
    history: History | None,
    why_sft: str,
) -> tuple[str, str, dict[str, Any]]:
    """No group for GRPO. Gold first (SFT) where the task has it; PPO where the harness samples
    and there is no gold, or SFT has not paid on this run; otherwise DPO's hard negatives
    (`_sft_or_dpo`). PPO and GRPO never for a harness that samples nothing (option scoring)."""
    gains, sampling = _gains(history), _sampling(ev, s)
    sft = gains.get("sft", [])
    no_gold = ev.accuracy is None
    if sampling is not None and (no_gold or (sft and max(sft) <= 0)):
        ppo = gains.get("ppo", [])
        if ppo and max(ppo) <= 0 and not no_gold:
            return _sft_or_dpo(ev, s, history, why_sft)
        if costs.get("ppo", costs["grpo"]) > budget.minutes_left:
            return _sft_or_dpo(
                ev, s, history,
                f"{why_sft} PPO (about {costs.get('ppo', costs['grpo']):.0f} min) does not fit "
                f"the {budget.minutes_left:.0f} min left.",
            )  # fmt: skip
        reason = (
            "the task scores episodes without a gold answer to imitate"
            if no_gold
            else f"SFT's {len(sft)} attempts on this run gained {max(sft):+.4g} on val at best"
        )
        why = (
            f"PPO: one sample per instance, so no group for GRPO; {sampling}; {reason}: a "
            "value baseline and token-level GAE credit every sampled call with the episode's "
            "reward."
        )
        return "ppo", why, dict(s.ppo_settings)
    return _sft_or_dpo(ev, s, history, why_sft)


def _sft_or_dpo(
    ev: Evidence, s: OfflineFeedbackSettings, history: History | None, why_sft: str
) -> tuple[str, str, dict[str, Any]]:
    """SFT on gold first; DPO once SFT has not paid on this run and the batch's wrong answers
    are valid ones (hard negatives); once both ran, the one with the larger best gain."""
    gains, sft = _gains(history), dict(s.sft_settings)
    tried = gains.get("sft", [])
    wrong = ev.wrong_valid_share or 0.0
    if not tried or max(tried) > 0 or wrong < s.dpo_wrong_share:
        return "sft", why_sft, sft
    dpo = gains.get("dpo", [])
    if dpo and max(dpo) <= max(tried):
        return (
            "sft",
            f"{why_sft} SFT gained {max(tried):+.4g} on val at best, DPO {max(dpo):+.4g}.",
            sft,
        )
    why = (
        f"DPO: SFT's {len(tried)} attempts on this run gained {max(tried):+.4g} on val at best, "
        f"and {wrong:.0%} of the batch are valid but wrong answers: each a hard negative to "
        "pair with gold."
    )
    return "dpo", why, dict(s.dpo_settings)


def method_for(
    ev: Evidence,
    budget: Budget,
    costs: dict[str, float],
    s: OfflineFeedbackSettings,
    history: History | None = None,
) -> tuple[str, str, dict[str, Any]]:
    """GRPO when at least `grpo_min_groups` sampled groups exist, `grpo_variance_share` of them
    vary, and GRPO fits the minutes left; otherwise SFT, PPO or DPO (`_without_groups`). Never
    GRPO without variance."""
    g = ev.groups
    share = g.share_with_variance
    if g.n_groups == 0 or share is None:
        why = "SFT: one sample per instance, so GRPO has no group to compare."
        return _without_groups(ev, budget, costs, s, history, why)
    if g.n_groups < s.grpo_min_groups or share < s.grpo_variance_share:
        why = (
            f"SFT: {share:.0%} of {g.n_groups} sampled groups have reward variance (GRPO "
            f"needs {s.grpo_variance_share:.0%} of at least {s.grpo_min_groups} groups)."
        )
        return _without_groups(ev, budget, costs, s, history, why)
    if costs["grpo"] > budget.minutes_left:
        why = (
            f"SFT: {share:.0%} of sampled groups have reward variance, but GRPO (about "
            f"{costs['grpo']:.0f} min) does not fit the {budget.minutes_left:.0f} min left."
        )
        return _without_groups(ev, budget, costs, s, history, why)
    why = (
        f"GRPO: {share:.0%} of {g.n_groups} sampled groups of up to {g.group_size} have "
        f"reward variance (mean {g.mean_variance or 0.0:.3g}), at or above "
        f"{s.grpo_variance_share:.0%}."
    )
    return "grpo", why, {**s.grpo_settings, "group_size": g.group_size}


def _fallback_focus(
    ev: Evidence, ctx: FeedbackContext, history: History, s: OfflineFeedbackSettings
) -> tuple[str | None, str]:
    near = _near_misses(ev, s)
    if near is not None and (family := ctx.declarations.signals[near.signal].family):
        return family, f"signal {near.signal!r} has near misses ({pct(near.near_miss_share)})"
    harness = [o for o in history.outcomes if o.decision.lever is Lever.harness]
    families = ctx.declarations.families
    stale = ev.levers[Lever.harness].trailing_rejections if Lever.harness in ev.levers else 0
    if families and stale >= len(families) and harness[-1].decision.settings.get("focus"):
        # every family has had its local moves since the last acceptance: alternate them with
        # the whole space, where the search can leave the incumbent's basin
        return None, (
            f"the last {stale} harness candidates were all rejected, as many as the declared "
            f"families: the whole space, every other generation"
        )
    recent = {o.decision.settings.get("focus") for o in harness[-s.recent_focus :]}
    last = {o.decision.settings.get("focus"): i for i, o in enumerate(harness)}
    fresh = [f for f in families if f not in recent]
    if fresh:
        # never focused (-1) first, then the longest ago; `min` keeps declaration order on ties:
        # every family gets its turn, not only the first few
        pick = min(fresh, key=lambda f: last.get(f, -1))
        return pick, (
            f"the declared family focused longest ago (never, or not in the last {s.recent_focus})"
        )
    return None, "no declared family left untried recently"


def fallback(
    lever: Lever,
    ev: Evidence,
    ctx: FeedbackContext,
    history: History,
    budget: Budget,
    costs: dict[str, float],
    s: OfflineFeedbackSettings,
) -> LeverProposal:
    """A lever's proposal when none of its rules fired: said plainly, ranked below support."""
    if lever is Lever.harness:
        focus, because = _fallback_focus(ev, ctx, history, s)
        ranked = ", ".join(
            f"gold absent in {pct(r.absent_share)} of {r.n_wrong} wrong answers by {n!r}"
            for n, r in ev.rankings.items()
        )
        why = (
            f"Harness, {_named(focus)} ({because}): no harness rule fired "
            f"({pct(ev.format_share)} format failures, {pct(ev.error_share)} rollout errors"
            f"{'; ' + ranked if ranked else ''})."
        )
        return LeverProposal(
            lever=lever,
            rule="fallback_harness",
            why=why,
            supported=False,
            settings=_harness_settings(focus, None, None),
            focus=focus,
        )
    method, method_why, settings = method_for(ev, budget, costs, s, history)
    shares = [r.near_miss_share for r in ev.rankings.values() if r.near_miss_share is not None]
    near = max(shares, default=None)
    why = (
        f"Weights ({method}): no learnable pattern stood out ({pct(ev.wrong_valid_share)} "
        f"valid-but-wrong answers, {pct(ev.repeated_confusion_share)} in repeated confusions, "
        f"near misses {pct(near)}). {method_why}"
    )
    return LeverProposal(
        lever=lever,
        rule="fallback_weights",
        why=why,
        supported=False,
        method=method,
        settings=settings,
        focus="reward" if method == "grpo" else "gold",
    )
