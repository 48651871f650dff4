"""Evidence: the numbers the Feedback-Agent reads from one generation's trajectories and the
run's history of decisions.

Everything here is computed from stored records only (Trajectory, Score, Decision), so any
number a Decision cites can be recomputed from the run directory. Nothing is task-specific:
the classification views (labels, confusions, gold rank) are read from the conventions tasks
already follow (`Score.detail` keys `prediction`, `valid`, `gold`; an output dict with `label`
and `ranked`, and optionally `prior_ranked`: the same options ranked by the harness's prior
signal alone, e.g. a retriever's vote) and are simply empty for tasks that do not follow them.

Guaranteed: a trajectory is counted once, in exactly one failure class; shares are over all
`n` trajectories unless the field says otherwise; a view with no data is `None` or empty,
never a made-up 0. Not guaranteed: per-class numbers on small batches are noisy, and the
gold-rank view is only as good as the harness's `ranked` list.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np

from sialoop.records import Decision, ErrorKind, Lever, Record, Trajectory

# A variance below this is float noise, not a difference in reward between samples.
_VARIANCE_EPS = 1e-12


class FailureClass(StrEnum):
    """Where one trajectory landed; every trajectory is in exactly one class."""

    correct = "correct"
    wrong_valid = "wrong_valid"  # a valid answer, not the gold one
    invalid_label = "invalid_label"  # a label outside the option set (detail.valid is False)
    unparsable = "unparsable"  # no answer: None, the wrong type, or output the task rejected
    timeout = "timeout"
    crash = "crash"  # the harness raised
    other_error = "other_error"  # memory, sandbox, policy errors; or a run that was never scored


FORMAT_FAILURES = (FailureClass.invalid_label, FailureClass.unparsable)
ROLLOUT_ERRORS = (FailureClass.timeout, FailureClass.crash, FailureClass.other_error)

_ERROR_CLASS = {
    ErrorKind.timeout: FailureClass.timeout,
    ErrorKind.crash: FailureClass.crash,
    # The task or the worker rejected the output itself: a format failure, not a harness fault.
    ErrorKind.invalid_output: FailureClass.unparsable,
}

TRAINABLE_LEVERS = (Lever.harness, Lever.weights)


class Outcome(Record):
    """What became of one past Decision: whether its candidate was accepted on val, the val
    gain it brought (candidate minus incumbent), and the wall minutes it cost."""

    decision: Decision
    accepted: bool
    val_gain: float
    minutes: float


class Confusion(Record):
    """Wrong-but-valid answers `predicted` where the gold was `gold`."""

    gold: str
    predicted: str
    count: int  # trajectories
    instances: int  # distinct instances (samples of one instance do not make a pattern)


class ClassStat(Record):
    label: str
    support: int
    accuracy: float


class RankHistogram(Record):
    """Gold's 1-based rank in the harness's `ranked` list, over trajectories with a known gold."""

    near_k: int  # `near` is ranks 2..near_k, `far` is ranks above near_k
    rank1: int = 0
    near: int = 0
    far: int = 0
    absent: int = 0  # a ranking was given and gold is not in it (not shortlisted)
    unknown: int = 0  # no ranking in the output


class GroupVariance(Record):
    """Reward variance among samples of one instance (the signal GRPO learns from)."""

    n_groups: int  # instances with two or more samples
    group_size: int  # the largest group
    mean_variance: float
    share_with_variance: float  # groups whose rewards are not all equal


class PriorView(Record):
    """How the harness's own prior ranking (`prior_ranked`) compares with its final answer, over
    trajectories with a known gold and a prior: a prior that is right more often than the
    answer is a signal the scoring leaves unused; an answer that always follows the prior is
    bounded by it."""

    n: int
    accuracy: float  # prior's top option == gold
    answer_accuracy: float  # the final answer == gold, on the same trajectories
    agreement: float  # the final answer == the prior's top option


class LeverStats(Record):
    lever: Lever
    attempts: int
    accepted: int
    total_gain: float  # val gain summed over accepted candidates (rejected ones changed nothing)
    total_minutes: float  # over all attempts: a rejected candidate still cost its time
    gain_per_minute: float | None  # None when never tried
    trailing_rejections: int  # rejections since this lever's last acceptance


class Evidence(Record):
    n: int
    n_instances: int
    accuracy: float  # correct / n; a failed or unscored rollout counts as not correct
    mean_reward: float  # mean Score.value; an unscored rollout counts as 0
    failures: dict[FailureClass, int]
    failure_shares: dict[FailureClass, float]
    format_share: float  # invalid_label + unparsable
    error_share: float  # timeout + crash + other_error
    wrong_valid_share: float
    confusions: list[Confusion]  # the most frequent gold -> predicted pairs
    repeated_confusion_share: float | None  # wrong-valid answers in pairs seen on >= 2 instances
    per_class: list[ClassStat]  # by gold label
    worst_classes: list[ClassStat]
    ranks: RankHistogram
    n_ranked_wrong: int  # wrong answers whose output carried a ranking
    near_miss_share: float | None  # of n_ranked_wrong: gold ranked 2..near_k (weights can fix)
    absent_share: float | None  # of n_ranked_wrong: gold not shortlisted (a harness fix)
    groups: GroupVariance
    prior: PriorView | None  # None when no output carried a `prior_ranked` list
    levers: dict[Lever, LeverStats]
    rejection_streak: int  # consecutive rejected candidates at the end of history, both levers


def is_correct(traj: Trajectory) -> bool:
    """`Score.correct` when the task set it, else a full reward."""
    if traj.error is not None or traj.score is None:
        return False
    if traj.score.correct is not None:
        return traj.score.correct
    return traj.score.value >= 1.0


def reward(traj: Trajectory) -> float:
    """The score's value; a rollout that was never scored earns nothing."""
    return traj.score.value if traj.score is not None else 0.0


def classify(traj: Trajectory) -> FailureClass:
    if traj.error is not None:
        return _ERROR_CLASS.get(traj.error.kind, FailureClass.other_error)
    if traj.score is None:
        return FailureClass.other_error
    if is_correct(traj):
        return FailureClass.correct
    detail = traj.score.detail
    if traj.output is None or ("prediction" in detail and detail["prediction"] is None):
        return FailureClass.unparsable
    if detail.get("valid") is False:
        return FailureClass.invalid_label
    return FailureClass.wrong_valid


def gold_of(traj: Trajectory) -> str | None:
    gold = traj.score.detail.get("gold") if traj.score is not None else None
    return gold if isinstance(gold, str) else None


def prediction_of(traj: Trajectory) -> str | None:
    if traj.score is not None and "prediction" in traj.score.detail:
        pred = traj.score.detail["prediction"]
        return pred if isinstance(pred, str) else None
    out = traj.output.get("label") if isinstance(traj.output, dict) else traj.output
    return out if isinstance(out, str) else None


def ranking_of(traj: Trajectory) -> list[Any] | None:
    """The options the harness scored, best first, when its output says so."""
    if isinstance(traj.output, dict) and isinstance(traj.output.get("ranked"), list):
        return traj.output["ranked"]
    return None


def _confusions(
    trajs: Sequence[Trajectory], classes: list[FailureClass], top: int
) -> tuple[list[Confusion], float | None]:
    counts: Counter[tuple[str, str]] = Counter()
    instances: dict[tuple[str, str], set[str]] = defaultdict(set)
    for traj, cls in zip(trajs, classes, strict=True):
        gold, pred = gold_of(traj), prediction_of(traj)
        if cls is FailureClass.wrong_valid and gold is not None and pred is not None:
            counts[(gold, pred)] += 1
            instances[(gold, pred)].add(traj.instance_id)
    pairs = [
        Confusion(gold=g, predicted=p, count=c, instances=len(instances[(g, p)]))
        for (g, p), c in counts.items()
    ]
    pairs.sort(key=lambda c: (-c.count, -c.instances, c.gold, c.predicted))
    total = sum(counts.values())
    repeated = sum(c.count for c in pairs if c.instances >= 2)
    return pairs[:top], (repeated / total if total else None)


def _per_class(
    trajs: Sequence[Trajectory], min_support: int, top: int
) -> tuple[list[ClassStat], list[ClassStat]]:
    seen: dict[str, list[bool]] = defaultdict(list)
    for traj in trajs:
        gold = gold_of(traj)
        if gold is not None:
            seen[gold].append(is_correct(traj))
    stats = [
        ClassStat(label=label, support=len(hits), accuracy=sum(hits) / len(hits))
        for label, hits in sorted(seen.items())
    ]
    worst = sorted(
        (s for s in stats if s.support >= min_support), key=lambda s: (s.accuracy, -s.support)
    )
    return stats, worst[:top]


def _ranks(
    trajs: Sequence[Trajectory], classes: list[FailureClass], near_k: int
) -> tuple[RankHistogram, int, float | None, float | None]:
    hist = {"rank1": 0, "near": 0, "far": 0, "absent": 0, "unknown": 0}
    wrong = Counter[str]()
    for traj, cls in zip(trajs, classes, strict=True):
        gold, ranked = gold_of(traj), ranking_of(traj)
        if gold is None:
            continue
        if ranked is None:
            bucket = "unknown"
        elif gold not in ranked:
            bucket = "absent"
        else:
            rank = ranked.index(gold) + 1
            bucket = "rank1" if rank == 1 else "near" if rank <= near_k else "far"
        hist[bucket] += 1
        if cls is not FailureClass.correct and bucket != "unknown":
            wrong[bucket] += 1
    n_wrong = sum(wrong.values())
    near = wrong["near"] / n_wrong if n_wrong else None
    absent = wrong["absent"] / n_wrong if n_wrong else None
    return RankHistogram(near_k=near_k, **hist), n_wrong, near, absent


def _prior(trajs: Sequence[Trajectory]) -> PriorView | None:
    rows = []
    for traj in trajs:
        gold, out = gold_of(traj), traj.output
        prior = out.get("prior_ranked") if isinstance(out, dict) else None
        if gold is None or not isinstance(prior, list) or not prior:
            continue
        answer = prediction_of(traj)
        rows.append((prior[0] == gold, is_correct(traj), answer == prior[0]))
    if not rows:
        return None
    n = len(rows)
    return PriorView(
        n=n,
        accuracy=sum(r[0] for r in rows) / n,
        answer_accuracy=sum(r[1] for r in rows) / n,
        agreement=sum(r[2] for r in rows) / n,
    )


def _groups(trajs: Sequence[Trajectory]) -> GroupVariance:
    by_instance: dict[str, list[float]] = defaultdict(list)
    for traj in trajs:
        by_instance[traj.instance_id].append(reward(traj))
    variances = [float(np.var(r)) for r in by_instance.values() if len(r) >= 2]
    if not variances:
        return GroupVariance(n_groups=0, group_size=1, mean_variance=0.0, share_with_variance=0.0)
    return GroupVariance(
        n_groups=len(variances),
        group_size=max(len(r) for r in by_instance.values()),
        mean_variance=float(np.mean(variances)),
        share_with_variance=sum(v > _VARIANCE_EPS for v in variances) / len(variances),
    )


def _trailing_rejections(outcomes: Sequence[Outcome]) -> int:
    streak = 0
    for outcome in reversed(outcomes):
        if outcome.accepted:
            break
        streak += 1
    return streak


def _per_minute(gain: float, minutes: float) -> float:
    # Attempts logged with no time are charged one minute, so their gain still counts.
    return gain / minutes if minutes > 0 else gain


def lever_stats(history: Sequence[Outcome]) -> dict[Lever, LeverStats]:
    """Attempts, acceptances, gain and cost per trainable lever; stop/baseline are not levers
    one pulls for a gain, so they are left out."""
    stats = {}
    for lever in TRAINABLE_LEVERS:
        mine = [o for o in history if o.decision.lever is lever]
        gain = sum(o.val_gain for o in mine if o.accepted)
        minutes = sum(o.minutes for o in mine)
        stats[lever] = LeverStats(
            lever=lever,
            attempts=len(mine),
            accepted=sum(o.accepted for o in mine),
            total_gain=gain,
            total_minutes=minutes,
            gain_per_minute=_per_minute(gain, minutes) if mine else None,
            trailing_rejections=_trailing_rejections(mine),
        )
    return stats


def compute_evidence(
    trajectories: Sequence[Trajectory],
    history: Sequence[Outcome] = (),
    *,
    near_k: int = 3,
    top: int = 5,
    min_support: int = 2,
) -> Evidence:
    """All views at once. `near_k` bounds a "near miss" (gold ranked 2..near_k); `top` caps the
    confusion and worst-class lists; `min_support` is the fewest gold items a worst class needs."""
    if near_k < 2:
        raise ValueError(f"near_k must be at least 2 (gold ranked 2..near_k), got {near_k}")
    n = len(trajectories)
    classes = [classify(t) for t in trajectories]
    counts = Counter(classes)
    failures = {cls: counts.get(cls, 0) for cls in FailureClass}
    shares = {cls: (c / n if n else 0.0) for cls, c in failures.items()}
    confusions, repeated = _confusions(trajectories, classes, top)
    per_class, worst = _per_class(trajectories, min_support, top)
    ranks, n_ranked_wrong, near, absent = _ranks(trajectories, classes, near_k)
    trainable = [o for o in history if o.decision.lever in TRAINABLE_LEVERS]
    return Evidence(
        n=n,
        n_instances=len({t.instance_id for t in trajectories}),
        accuracy=shares[FailureClass.correct],
        mean_reward=(sum(reward(t) for t in trajectories) / n if n else 0.0),
        failures=failures,
        failure_shares=shares,
        format_share=sum(shares[c] for c in FORMAT_FAILURES),
        error_share=sum(shares[c] for c in ROLLOUT_ERRORS),
        wrong_valid_share=shares[FailureClass.wrong_valid],
        confusions=confusions,
        repeated_confusion_share=repeated,
        per_class=per_class,
        worst_classes=worst,
        ranks=ranks,
        n_ranked_wrong=n_ranked_wrong,
        near_miss_share=near,
        absent_share=absent,
        groups=_groups(trajectories),
        prior=_prior(trajectories),
        levers=lever_stats(history),
        rejection_streak=_trailing_rejections(trainable),
    )
