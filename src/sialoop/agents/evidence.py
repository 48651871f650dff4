"""Evidence: the numbers the Feedback-Agent reads from one generation's trajectories and the
run's history of decisions.

Everything here is computed from stored records only (Trajectory, Score, Decision) and from what
the task and the harness declare (`FeedbackContext`: the Metric, the harness's signals and its
answer key), so any number a Decision cites can be recomputed from the run directory. No field
name of any task is written here: the label views read the generic `Score.detail` keys
`prediction`, `valid` and `gold`; the answer is the output's declared `answer_key` (or the output
itself when it is not a dict); a signal is read from the output by its declared name.

Views: failures by class; the score distribution oriented in the metric's direction (and raw);
accuracy, per-gold accuracy and confusions where the task defines correctness; per declared
`ranking` signal the gold rank histogram; per declared `alternative` signal how it compares
with the answer; reward variance within sampled groups; seconds and tokens per item; gain per
minute of each lever.

Guaranteed: a trajectory is counted once, in exactly one failure class; shares are over all `n`
trajectories unless the field says otherwise; a view with no data is `None` or empty, never a
made-up 0 (accuracy is None for a task without correctness, a signal no output carried has no
entry). Labels are compared as stripped text, so the answer `4` and the gold `"4"` agree. Not
guaranteed: per-class numbers on small batches are noisy, and a signal's views are only as
good as what the harness returns under its name.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np

from sialoop.agents.base import FeedbackContext, Outcome
from sialoop.records import ErrorKind, Lever, Record, Trajectory
from sialoop.tasks.base import Metric

# A variance below this is float noise, not a difference in reward between samples.
_VARIANCE_EPS = 1e-12


class FailureClass(StrEnum):
    """Where one trajectory landed; every trajectory is in exactly one class."""

    correct = "correct"
    wrong_valid = "wrong_valid"  # a valid answer, not the gold one
    scored = "scored"  # a valid output of a task that defines no correctness (a measurement)
    invalid_label = "invalid_label"  # an answer outside the option set (detail.valid is False)
    unparsable = "unparsable"  # no answer: None, the wrong type, or output the task rejected
    timeout = "timeout"
    crash = "crash"  # the harness raised
    other_error = "other_error"  # memory, sandbox, policy errors; or a run that was never scored


FORMAT_FAILURES = (FailureClass.invalid_label, FailureClass.unparsable)
ROLLOUT_ERRORS = (FailureClass.timeout, FailureClass.crash, FailureClass.other_error)
_NOT_WRONG = (FailureClass.correct, FailureClass.scored)

_ERROR_CLASS = {
    ErrorKind.timeout: FailureClass.timeout,
    ErrorKind.crash: FailureClass.crash,
    # The task or the worker rejected the output itself: a format failure, not a harness fault.
    ErrorKind.invalid_output: FailureClass.unparsable,
}

TRAINABLE_LEVERS = (Lever.harness, Lever.weights)


class ScoreDistribution(Record):
    """Score values over the scored trajectories. `mean`..`worst` are oriented (`Metric.sign *
    value`: higher is better, so `best` is the max); `raw_*` are the same items in the metric's
    own units. Every statistic is None when no trajectory was scored."""

    n_scored: int
    share_scored: float | None  # of all n; None when n is 0
    mean: float | None = None
    median: float | None = None
    best: float | None = None
    worst: float | None = None
    raw_mean: float | None = None
    raw_median: float | None = None
    raw_best: float | None = None
    raw_worst: float | None = None


class Confusion(Record):
    """Wrong-but-valid answers `predicted` where the gold was `gold` (labels as text)."""

    gold: str
    predicted: str
    count: int  # trajectories
    instances: int  # distinct instances (samples of one instance do not make a pattern)


class ClassStat(Record):
    label: str
    support: int
    accuracy: float


class RankHistogram(Record):
    """Gold's 1-based rank in one `ranking` signal's candidates, over trajectories with a known
    gold; and, among the wrong answers whose output carried the ranking, the share of near
    misses (gold ranked 2..near_k: the weights can fix) and of gold absent (a harness fix)."""

    signal: str
    near_k: int  # `near` is ranks 2..near_k, `far` is ranks above near_k
    rank1: int = 0
    near: int = 0
    far: int = 0
    absent: int = 0  # a ranking was given and gold is not among its candidates
    unknown: int = 0  # no ranking under this name in the output
    n_wrong: int = 0  # wrong answers whose output carried the ranking
    near_miss_share: float | None = None  # of n_wrong
    absent_share: float | None = None  # of n_wrong


class AlternativeView(Record):
    """One `alternative` signal (another answer, or a ranking whose first item is one) against
    the harness's answer, over trajectories with a known gold that carry it. An alternative right
    more often than the answer is a signal the harness leaves unused; an answer that always
    follows it is bounded by it."""

    signal: str
    n: int
    accuracy: float  # the alternative == gold
    answer_accuracy: float  # the answer is correct, on the same trajectories
    gap: float  # accuracy - answer_accuracy (= beats - loses)
    beats: float  # the alternative is right and the answer is not
    loses: float  # the answer is right and the alternative is not
    agreement: float  # the answer == the alternative


class GroupVariance(Record):
    """Reward variance among samples of one instance (the signal GRPO learns from). The reward
    is the oriented score; an unscored sample counts as the metric's `failure_value` when it has
    one, else as the worst scored value of its group, and a group mixing scored and unscored
    samples counts as varying (a failure differs from what was scored)."""

    n_groups: int  # instances with two or more samples
    group_size: int  # the largest group (0 without trajectories)
    mean_variance: float | None = None  # None without groups
    share_with_variance: float | None = None  # groups whose rewards are not all equal


class EpisodeShape(Record):
    """What the harness's episodes did with the policy: what PPO and GRPO need (sampled tokens)
    and what an option-scoring harness lacks. Over trajectories that counted their calls."""

    n: int  # trajectories that know their calls
    mean_calls: float | None = None
    multi_call_share: float | None = None  # episodes of two or more calls
    sampling_share: float | None = None  # episodes in which the policy sampled tokens
    mean_sampled_tokens: float | None = None  # per sampling episode
    reward_std: float | None = None  # of the oriented scores over the batch


class LeverStats(Record):
    lever: Lever
    attempts: int
    accepted: int
    total_gain: float  # val gain summed over accepted candidates (None gains count as none)
    total_minutes: float  # over all attempts: a rejected candidate still cost its time
    gain_per_minute: float | None  # None when never tried
    trailing_rejections: int  # rejections since this lever's last acceptance


class Evidence(Record):
    n: int
    n_instances: int
    metric: str
    direction: str  # "higher" or "lower" is better
    accuracy: float | None  # correct / n where the task defines correctness, else None
    scores: ScoreDistribution
    failures: dict[FailureClass, int]
    failure_shares: dict[FailureClass, float]  # empty when n is 0
    format_share: float | None  # invalid_label + unparsable; None when n is 0
    error_share: float | None  # timeout + crash + other_error
    wrong_valid_share: float | None
    confusions: list[Confusion]  # the most frequent gold -> predicted pairs
    repeated_confusion_share: float | None  # wrong-valid answers in pairs seen on >= 2 instances
    per_class: list[ClassStat]  # by gold label, where correctness is defined
    worst_classes: list[ClassStat]
    rankings: dict[str, RankHistogram]  # per declared ranking signal some output carried
    alternatives: dict[str, AlternativeView]  # per declared alternative signal with data
    groups: GroupVariance
    episodes: EpisodeShape = EpisodeShape(n=0)
    seconds_per_item: float | None
    tokens_per_item: float | None  # over trajectories that know their tokens; None if none do
    levers: dict[Lever, LeverStats]
    rejection_streak: int  # consecutive rejected candidates at the end of history, both levers


def label_text(value: Any) -> str | None:
    """A label as comparable text: strings stripped, numbers as written; None for anything
    else (a dict, a list, None: not one answer)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return str(value)


def correctness_defined(trajectories: Sequence[Trajectory], metric: Metric) -> bool:
    """The task says what "correct" means: its metric does, or a score carries a verdict."""
    return metric.correct is not None or any(
        t.score is not None and t.score.correct is not None for t in trajectories
    )


def is_correct(traj: Trajectory) -> bool:
    """`Score.correct` when the task set it, else a full reward (only read where correctness is
    defined); a failed or unscored rollout is not correct."""
    if traj.error is not None or traj.score is None:
        return False
    if traj.score.correct is not None:
        return traj.score.correct
    return traj.score.value >= 1.0


def classify(traj: Trajectory, defined: bool = True) -> FailureClass:
    """The trajectory's class; `defined`: whether the task defines correctness."""
    if traj.error is not None:
        return _ERROR_CLASS.get(traj.error.kind, FailureClass.other_error)
    if traj.score is None:
        return FailureClass.other_error
    if defined and is_correct(traj):
        return FailureClass.correct
    detail = traj.score.detail
    if traj.output is None or ("prediction" in detail and detail["prediction"] is None):
        return FailureClass.unparsable
    if detail.get("valid") is False:
        return FailureClass.invalid_label
    return FailureClass.wrong_valid if defined else FailureClass.scored


def gold_of(traj: Trajectory) -> str | None:
    return label_text(traj.score.detail.get("gold")) if traj.score is not None else None


def answer_of(traj: Trajectory, answer_key: str) -> Any:
    """The harness's answer: the output's `answer_key` entry, or the output itself."""
    out = traj.output
    return out.get(answer_key) if isinstance(out, dict) else out


def prediction_of(traj: Trajectory, answer_key: str) -> str | None:
    """The task's reading of the answer (`Score.detail["prediction"]`), else the answer."""
    if traj.score is not None and "prediction" in traj.score.detail:
        return label_text(traj.score.detail["prediction"])
    return label_text(answer_of(traj, answer_key))


def signal_of(traj: Trajectory, name: str) -> Any:
    return traj.output.get(name) if isinstance(traj.output, dict) else None


def _distribution(trajs: Sequence[Trajectory], metric: Metric) -> ScoreDistribution:
    raw = [t.score.value for t in trajs if t.score is not None]
    share = len(raw) / len(trajs) if trajs else None
    if not raw:
        return ScoreDistribution(n_scored=0, share_scored=share)
    oriented = [metric.sign * v for v in raw]
    mean, median = statistics.fmean(oriented), statistics.median(oriented)
    best, worst = max(oriented), min(oriented)
    return ScoreDistribution(
        n_scored=len(raw),
        share_scored=share,
        mean=mean,
        median=median,
        best=best,
        worst=worst,
        raw_mean=metric.sign * mean,
        raw_median=metric.sign * median,
        raw_best=metric.sign * best,
        raw_worst=metric.sign * worst,
    )


def _confusions(
    trajs: Sequence[Trajectory], classes: list[FailureClass], answer_key: str, top: int
) -> tuple[list[Confusion], float | None]:
    counts: Counter[tuple[str, str]] = Counter()
    instances: dict[tuple[str, str], set[str]] = defaultdict(set)
    for traj, cls in zip(trajs, classes, strict=True):
        gold, pred = gold_of(traj), prediction_of(traj, answer_key)
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


def _ranking(
    name: str, trajs: Sequence[Trajectory], classes: list[FailureClass], near_k: int
) -> RankHistogram | None:
    hist = {"rank1": 0, "near": 0, "far": 0, "absent": 0, "unknown": 0}
    wrong = Counter[str]()
    carried = False
    for traj, cls in zip(trajs, classes, strict=True):
        gold, ranked = gold_of(traj), signal_of(traj, name)
        carried = carried or isinstance(ranked, list)
        if gold is None:
            continue
        if not isinstance(ranked, list):
            bucket = "unknown"
        else:
            texts = [label_text(c) for c in ranked]
            if gold not in texts:
                bucket = "absent"
            else:
                rank = texts.index(gold) + 1
                bucket = "rank1" if rank == 1 else "near" if rank <= near_k else "far"
        hist[bucket] += 1
        if cls not in _NOT_WRONG and bucket != "unknown":
            wrong[bucket] += 1
    if not carried:
        return None
    n_wrong = sum(wrong.values())
    return RankHistogram(
        signal=name,
        near_k=near_k,
        **hist,
        n_wrong=n_wrong,
        near_miss_share=wrong["near"] / n_wrong if n_wrong else None,
        absent_share=wrong["absent"] / n_wrong if n_wrong else None,
    )


def _alternative(
    name: str, trajs: Sequence[Trajectory], answer_key: str, defined: bool
) -> AlternativeView | None:
    rows = []
    for traj in trajs:
        gold, value = gold_of(traj), signal_of(traj, name)
        if isinstance(value, list):
            value = value[0] if value else None
        alt = label_text(value)
        if gold is None or alt is None:
            continue
        answer = prediction_of(traj, answer_key)
        answer_right = is_correct(traj) if defined else answer == gold
        rows.append((alt == gold, answer_right, answer == alt))
    if not rows:
        return None
    n = len(rows)
    accuracy = sum(r[0] for r in rows) / n
    answer_accuracy = sum(r[1] for r in rows) / n
    return AlternativeView(
        signal=name,
        n=n,
        accuracy=accuracy,
        answer_accuracy=answer_accuracy,
        gap=accuracy - answer_accuracy,
        beats=sum(r[0] and not r[1] for r in rows) / n,
        loses=sum(r[1] and not r[0] for r in rows) / n,
        agreement=sum(r[2] for r in rows) / n,
    )


def _group_rewards(group: list[Trajectory], metric: Metric) -> tuple[list[float], bool]:
    """Oriented rewards of one group, unscored samples filled in; and whether it mixes scored
    and unscored samples."""
    scored = [metric.sign * t.score.value for t in group if t.score is not None]
    fill = metric.oriented(metric.failure_value)
    if fill is None:
        fill = min(scored) if scored else 0.0  # all unscored: equal rewards, whatever the fill
    rewards = [metric.sign * t.score.value if t.score is not None else fill for t in group]
    return rewards, 0 < len(scored) < len(group)


def _groups(trajs: Sequence[Trajectory], metric: Metric) -> GroupVariance:
    by_instance: dict[str, list[Trajectory]] = defaultdict(list)
    for traj in trajs:
        by_instance[traj.instance_id].append(traj)
    size = max((len(g) for g in by_instance.values()), default=0)
    variances, varying = [], 0
    for group in by_instance.values():
        if len(group) < 2:
            continue
        rewards, mixed = _group_rewards(group, metric)
        variances.append(float(np.var(rewards)))
        varying += mixed or variances[-1] > _VARIANCE_EPS
    if not variances:
        return GroupVariance(n_groups=0, group_size=size)
    return GroupVariance(
        n_groups=len(variances),
        group_size=size,
        mean_variance=float(np.mean(variances)),
        share_with_variance=varying / len(variances),
    )


def _episodes(trajs: Sequence[Trajectory], metric: Metric) -> EpisodeShape:
    known = [t for t in trajs if t.calls is not None]
    rewards = [
        metric.sign * t.score.value
        for t in trajs
        if t.score is not None and t.score.value is not None
    ]
    std = float(np.std(rewards)) if len(rewards) > 1 else None
    if not known:
        return EpisodeShape(n=0, reward_std=std)
    sampling = [t for t in known if (t.sampled_tokens or 0) > 0]
    return EpisodeShape(
        n=len(known),
        mean_calls=_mean([float(t.calls or 0) for t in known]),
        multi_call_share=sum((t.calls or 0) > 1 for t in known) / len(known),
        sampling_share=len(sampling) / len(known),
        mean_sampled_tokens=_mean([float(t.sampled_tokens or 0) for t in sampling]),
        reward_std=std,
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
    one pulls for a gain, so they are left out. Gains are `Outcome.val_gain`, already oriented;
    a gain never measured (None) adds nothing."""
    stats = {}
    for lever in TRAINABLE_LEVERS:
        mine = [o for o in history if o.decision.lever is lever]
        gain = sum(o.val_gain or 0.0 for o in mine if o.accepted)
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


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def compute_evidence(
    trajectories: Sequence[Trajectory],
    context: FeedbackContext,
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
    metric, decl = context.metric, context.declarations
    n = len(trajectories)
    defined = correctness_defined(trajectories, metric)
    classes = [classify(t, defined) for t in trajectories]
    counts = Counter(classes)
    failures = {cls: counts.get(cls, 0) for cls in FailureClass}
    shares = {cls: c / n for cls, c in failures.items()} if n else {}
    confusions, repeated = _confusions(trajectories, classes, decl.answer_key, top)
    per_class, worst = _per_class(trajectories, min_support, top) if defined else ([], [])
    rankings, alternatives = {}, {}
    for name, spec in decl.signals.items():
        if spec.kind == "ranking" and (rank := _ranking(name, trajectories, classes, near_k)):
            rankings[name] = rank
        elif spec.kind == "alternative" and (
            alt := _alternative(name, trajectories, decl.answer_key, defined)
        ):
            alternatives[name] = alt
    tokens = [t.tokens for t in trajectories if t.tokens is not None]
    trainable = [o for o in history if o.decision.lever in TRAINABLE_LEVERS]
    return Evidence(
        n=n,
        n_instances=len({t.instance_id for t in trajectories}),
        metric=metric.name,
        direction=metric.direction,
        accuracy=shares[FailureClass.correct] if defined and n else None,
        scores=_distribution(trajectories, metric),
        failures=failures,
        failure_shares=shares,
        format_share=sum(shares[c] for c in FORMAT_FAILURES) if n else None,
        error_share=sum(shares[c] for c in ROLLOUT_ERRORS) if n else None,
        wrong_valid_share=shares[FailureClass.wrong_valid] if n else None,
        confusions=confusions,
        repeated_confusion_share=repeated,
        per_class=per_class,
        worst_classes=worst,
        rankings=rankings,
        alternatives=alternatives,
        groups=_groups(trajectories, metric),
        episodes=_episodes(trajectories, metric),
        seconds_per_item=_mean([t.cost_seconds for t in trajectories]),
        tokens_per_item=_mean(tokens),
        levers=lever_stats(history),
        rejection_streak=_trailing_rejections(trainable),
    )
