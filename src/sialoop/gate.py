"""The val gate: a candidate version replaces the incumbent only if it beats it on the same val
items by more than noise.

Pairing: by `instance_id`, over the items both versions were rolled out on; items only one side
has are ignored. Within a pair a rollout that was never scored (an error) counts as 0, since
for the incumbent-vs-candidate question a failed rollout earns nothing; samples of one instance
are averaged.

Test: one-sided, H1 "the candidate scores higher".
- Every paired score is 0 or 1: exact McNemar, i.e. a binomial test on the discordant pairs
  (candidate right where the incumbent was wrong vs the reverse) with p = 1/2.
- Otherwise: a paired bootstrap on the per-item differences with a fixed seed; p is the share of
  resampled mean differences <= 0 (with the usual +1 so p is never exactly 0).

Defaults: alpha 0.1 and margin 0.0. Val subsets are small (about 150 items), so a 5% test
would reject most real gains of a few points and waste the generation that made them; 10%
one-sided bounds the false-acceptance rate per candidate at 10%. The final test score, taken
once at the end, stays the unbiased estimate. The margin is 0 because the test already prices
in noise; raise it to demand a practical gain on top of a significant one.

Not guaranteed: across many generations false acceptances add up (no multiple-testing
correction); the bootstrap assumes items are exchangeable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import binomtest

from sialoop.records import Record, Trajectory

_CHUNK = 1_000  # bootstrap resamples drawn at a time, to bound memory on large val sets


class GateSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.1, gt=0, lt=1)
    margin: float = Field(default=0.0, ge=0)
    n_bootstrap: int = Field(default=10_000, ge=100)
    seed: int = 0


class GateResult(Record):
    accepted: bool
    incumbent_score: float | None  # mean over paired items; None when nothing was paired
    candidate_score: float | None
    delta: float  # candidate minus incumbent
    p_value: float
    test: Literal["mcnemar-exact", "paired-bootstrap", "none"]
    n_paired: int
    margin: float
    alpha: float
    reason: str


def _by_instance(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    values: dict[str, list[float]] = defaultdict(list)
    for traj in trajectories:
        values[traj.instance_id].append(traj.score.value if traj.score is not None else 0.0)
    return {iid: sum(v) / len(v) for iid, v in values.items()}


def paired_scores(
    incumbent: Sequence[Trajectory], candidate: Sequence[Trajectory]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item scores of both versions on the instances both were rolled out on, sorted by id."""
    inc, cand = _by_instance(incumbent), _by_instance(candidate)
    shared = sorted(inc.keys() & cand.keys())
    return np.array([inc[i] for i in shared]), np.array([cand[i] for i in shared])


def mcnemar_exact(inc: np.ndarray, cand: np.ndarray) -> float:
    """One-sided p that the candidate is not better, from the discordant 0/1 pairs."""
    wins = int(np.sum((cand == 1) & (inc == 0)))
    losses = int(np.sum((cand == 0) & (inc == 1)))
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def paired_bootstrap(inc: np.ndarray, cand: np.ndarray, n_boot: int, seed: int) -> float:
    """One-sided p: the share of resampled mean differences that are <= 0."""
    diffs = cand - inc
    rng = np.random.default_rng(seed)
    not_better = 0
    for start in range(0, n_boot, _CHUNK):
        rows = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, len(diffs), size=(rows, len(diffs)))
        not_better += int(np.sum(diffs[idx].mean(axis=1) <= 0))
    return (not_better + 1) / (n_boot + 1)


def gate(
    incumbent: Sequence[Trajectory],
    candidate: Sequence[Trajectory],
    settings: GateSettings | None = None,
) -> GateResult:
    """Accept the candidate only if delta > margin and p < alpha on the paired val items."""
    s = settings or GateSettings()
    inc, cand = paired_scores(incumbent, candidate)
    if len(inc) == 0:
        return GateResult(
            accepted=False,
            incumbent_score=None,
            candidate_score=None,
            delta=0.0,
            p_value=1.0,
            test="none",
            n_paired=0,
            margin=s.margin,
            alpha=s.alpha,
            reason="rejected: no val item was scored for both versions",
        )
    binary = bool(np.all(np.isin(inc, (0.0, 1.0))) and np.all(np.isin(cand, (0.0, 1.0))))
    if binary:
        test, p = "mcnemar-exact", mcnemar_exact(inc, cand)
    else:
        test, p = "paired-bootstrap", paired_bootstrap(inc, cand, s.n_bootstrap, s.seed)
    delta = float(cand.mean() - inc.mean())
    accepted = delta > s.margin and p < s.alpha
    verdict = "accepted" if accepted else "rejected"
    reason = (
        f"{verdict}: candidate {cand.mean():.4f} vs incumbent {inc.mean():.4f} on {len(inc)} "
        f"paired val items, delta {delta:+.4f} (needs > {s.margin:g}), {test} one-sided "
        f"p = {p:.4f} (needs < {s.alpha:g})"
    )
    return GateResult(
        accepted=accepted,
        incumbent_score=float(inc.mean()),
        candidate_score=float(cand.mean()),
        delta=delta,
        p_value=p,
        test=test,
        n_paired=len(inc),
        margin=s.margin,
        alpha=s.alpha,
        reason=reason,
    )
