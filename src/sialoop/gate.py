"""The val gate: a candidate version replaces the incumbent only if it beats it on the same val
items by more than noise, in the metric's direction, or matches it at a clearly lower cost.

Pairing (`pair_units`): by instance ("items": samples of one instance averaged), or, when the
task's noise model is "units", unit by unit from each score's `detail["units"]` (a mapping of
unit name to value: repeated measurements of one item, or its parts scored one by one), keyed
`instance/unit`. Only keys both versions were rolled out on are compared; an instance that
failed on one side (no units: key `instance/*`) counts as None on each unit the other side
scored for it, so a version that fails an item loses every unit of it.

A value that was never computed (an error, a missing unit) is None, and in a pair a None is a
loss for its side: it loses by the full range of the values seen on both sides (1 for a 0/1
score), never counts as 0 (the best value of a time or an error) and is never dropped. Two
Nones tie.

Tests, one-sided, on the oriented differences d = sign * (candidate - incumbent):
- better: H1 "mean d > 0". Every pair 0/1 with no None: exact McNemar (a binomial test on the
  discordant pairs). Otherwise a paired bootstrap with a fixed seed: p is the share of resampled
  means <= 0 (with the usual +1). Accepted when mean d > `min_gain` and p < alpha.
- cheaper: when not better, the candidate is accepted if its seconds per item (the harness's
  plus the scorer's run of the program it returns, `Trajectory.cost_seconds`) are at most
  (1 - `cheaper`) of the incumbent's and a bootstrap says mean d > -margin (p < alpha), with
  margin = `noninferiority_margin` times the incumbent's mean |value|.
- Fewer than 10 pairs: the bootstrap's p is raised to the exact sign test's, since resampling
  two or three pairs says nothing about noise (a task with few items declares "units").

Defaults: alpha 0.1. Val subsets are small (about 150 items), so a 5% test would reject most
real gains of a few points; 10% one-sided bounds the false-acceptance rate per candidate. The
final test score, taken once at the end, stays the unbiased estimate.

Degraded evaluations: when more than `degraded_share` of either side's trajectories failed for
the machine's reasons (`RolloutError.infra`: the OOM killer, a timeout on a fresh worker, after
the sandbox's one retry), its score says more about the machine than the harness, and the gate
refuses to decide: the candidate is rejected with a reason naming the share and the kinds.

One call is one look. The loop's adaptive gate (sialoop/sequential.py, loop.gate_candidate) calls
it again on more val items while a candidate is undecided, each time at that look's nominal
alpha, so the false-acceptance rate over all looks of one candidate stays at alpha.

Not guaranteed: across many generations false acceptances add up (no multiple-testing
correction); the bootstrap assumes pairs are exchangeable (units of one item are not
independent, so the "units" model is optimistic when units share an item's noise).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import binomtest

from sialoop.records import Record, Trajectory
from sialoop.tasks.base import ACCURACY, Metric

_CHUNK = 1_000  # bootstrap resamples drawn at a time, to bound memory on large val sets
_FEW_PAIRS = 10  # below this many pairs the sign test bounds the bootstrap's p from below
DEGRADED_SHARE = 0.1  # the default of sandbox.degraded_share
Noise = Literal["items", "units"]


class GateSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.1, gt=0, lt=1)
    min_gain: float = Field(default=0.0, ge=0)
    noninferiority_margin: float = Field(default=0.01, ge=0, lt=1)
    cheaper: float = Field(default=0.2, gt=0, lt=1)
    noise: Noise = "items"
    n_bootstrap: int = Field(default=10_000, ge=100)
    seed: int = 0
    # More infrastructure failures than this share of a side's trajectories: no decision.
    degraded_share: float = Field(default=DEGRADED_SHARE, ge=0, le=1)


class GateResult(Record):
    accepted: bool
    verdict: Literal["better", "cheaper", "rejected"] = "rejected"
    direction: str = "higher"
    incumbent_score: float | None  # mean over paired units with a value; None: none had one
    candidate_score: float | None
    delta: float  # mean oriented difference: positive means the candidate is better
    p_value: float
    p_noninferior: float | None = None
    test: Literal["mcnemar-exact", "paired-bootstrap", "none"]
    n_paired: int
    wins: int = 0
    losses: int = 0
    incumbent_none: int = 0
    candidate_none: int = 0
    incumbent_seconds: float | None = None  # per item
    candidate_seconds: float | None = None
    margin: float  # min_gain
    alpha: float
    reason: str
    degraded: bool = False  # refused: an evaluation had too many infrastructure failures
    # The adaptive gate's looks, each {n, p_value, p_noninferior, nominal_alpha, verdict}; this
    # result is the last one's. Empty: a single look, at `alpha`.
    looks: list[dict[str, Any]] = Field(default_factory=list)
    overall_alpha: float | None = None  # the false-acceptance bound over all planned looks
    planned: list[int] = Field(default_factory=list)  # val items at each planned look


def infra_failures(trajectories: Sequence[Trajectory]) -> int:
    """Trajectories whose final error was the machine's, not the harness's."""
    return sum(t.error is not None and t.error.infra for t in trajectories)


def _degraded(side: str, trajectories: Sequence[Trajectory], share: float) -> str | None:
    """Why `side`'s evaluation is degraded, or None when it is not."""
    infra = [t.error.kind.value for t in trajectories if t.error is not None and t.error.infra]
    if not trajectories or len(infra) <= share * len(trajectories):
        return None
    kinds = ", ".join(f"{kind} {infra.count(kind)}" for kind in sorted(set(infra)))
    return (
        f"the {side}'s val evaluation is degraded: {len(infra)} of {len(trajectories)} items "
        f"({len(infra) / len(trajectories):.0%}) failed for the machine's reasons ({kinds}), "
        f"above the allowed {share:.0%}"
    )


def _value(traj: Trajectory) -> float | None:
    return traj.score.value if traj.score is not None and traj.error is None else None


def pair_units(trajectories: Sequence[Trajectory], noise: Noise) -> dict[str, float | None]:
    """Key -> value: per instance (mean over samples with a value; None if none has one), or per
    `instance/unit` from `Score.detail["units"]` (None where the trajectory failed)."""
    if noise == "units":
        units: dict[str, list[float | None]] = defaultdict(list)
        for traj in trajectories:
            found = traj.score.detail.get("units") if traj.score is not None else None
            if isinstance(found, dict) and traj.error is None:
                for name, value in found.items():
                    units[f"{traj.instance_id}/{name}"].append(
                        float(value) if isinstance(value, int | float) else None
                    )
            else:
                units[f"{traj.instance_id}/*"].append(None)
        return {k: _mean(v) for k, v in units.items()}
    by_item: dict[str, list[float | None]] = defaultdict(list)
    for traj in trajectories:
        by_item[traj.instance_id].append(_value(traj))
    return {k: _mean(v) for k, v in by_item.items()}


def _spread_failures(
    side: dict[str, float | None], other: dict[str, float | None]
) -> dict[str, float | None]:
    """`side` with each failed instance's `instance/*` replaced by None on the units `other`
    scored for that instance."""
    units_of: dict[str, list[str]] = defaultdict(list)
    for key in other:
        item, unit = key.split("/", 1)
        if unit != "*":
            units_of[item].append(key)
    out: dict[str, float | None] = {}
    for key, value in side.items():
        item, unit = key.split("/", 1)
        if unit == "*" and units_of.get(item):
            for unit_key in units_of[item]:
                out.setdefault(unit_key, None)
        else:
            out[key] = value
    return out


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def oriented_differences(
    inc: list[float | None], cand: list[float | None], metric: Metric
) -> np.ndarray:
    """d = sign * (cand - inc) per pair; a None side loses by the range of the known values."""
    known = [v for v in (*inc, *cand) if v is not None]
    spread = (max(known) - min(known)) if known else 1.0
    spread = spread or 1.0
    out = []
    for i, c in zip(inc, cand, strict=True):
        if i is None and c is None:
            out.append(0.0)
        elif c is None:
            out.append(-spread)
        elif i is None:
            out.append(spread)
        else:
            out.append(metric.sign * (c - i))
    return np.array(out, dtype=float)


def mcnemar_exact(wins: int, losses: int) -> float:
    """One-sided p that the candidate is not better, from the discordant pairs."""
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def paired_bootstrap(diffs: np.ndarray, n_boot: int, seed: int, shift: float = 0.0) -> float:
    """One-sided p: the share of resampled mean differences that are <= `-shift`."""
    rng = np.random.default_rng(seed)
    not_better = 0
    for start in range(0, n_boot, _CHUNK):
        rows = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, len(diffs), size=(rows, len(diffs)))
        not_better += int(np.sum(diffs[idx].mean(axis=1) <= -shift))
    return (not_better + 1) / (n_boot + 1)


def _seconds(trajectories: Sequence[Trajectory], keys: set[str]) -> float | None:
    picked = [t.cost_seconds for t in trajectories if t.instance_id in keys]
    return sum(picked) / len(picked) if picked else None


def _mean_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def gate(
    incumbent: Sequence[Trajectory],
    candidate: Sequence[Trajectory],
    settings: GateSettings | None = None,
    metric: Metric = ACCURACY,
) -> GateResult:
    """Accept the candidate when it is better beyond noise, or no worse and clearly cheaper;
    reject without a test when either side's evaluation is degraded."""
    s = settings or GateSettings()
    common = {"direction": metric.direction, "margin": s.min_gain, "alpha": s.alpha}
    why = _degraded("incumbent", incumbent, s.degraded_share) or _degraded(
        "candidate", candidate, s.degraded_share
    )
    if why is not None:
        return GateResult(
            accepted=False, incumbent_score=None, candidate_score=None, delta=0.0, p_value=1.0,
            test="none", n_paired=0, degraded=True, reason=f"rejected (no decision): {why}; "
            "re-score it on a machine with room", **common,
        )  # fmt: skip
    inc_units, cand_units = pair_units(incumbent, s.noise), pair_units(candidate, s.noise)
    if s.noise == "units":
        inc_units, cand_units = (
            _spread_failures(inc_units, cand_units),
            _spread_failures(cand_units, inc_units),
        )
    shared = sorted(inc_units.keys() & cand_units.keys())
    if not shared:
        return GateResult(
            accepted=False, incumbent_score=None, candidate_score=None, delta=0.0, p_value=1.0,
            test="none", n_paired=0, reason="rejected: no val item was scored for both versions",
            **common,
        )  # fmt: skip
    inc = [inc_units[k] for k in shared]
    cand = [cand_units[k] for k in shared]
    diffs = oriented_differences(inc, cand, metric)
    wins, losses = int(np.sum(diffs > 0)), int(np.sum(diffs < 0))
    binary = all(v in (0.0, 1.0) for v in (*inc, *cand) if v is not None)
    if binary:
        test, p = "mcnemar-exact", mcnemar_exact(wins, losses)
    else:
        test, p = "paired-bootstrap", paired_bootstrap(diffs, s.n_bootstrap, s.seed)
        if len(shared) < _FEW_PAIRS:  # a bootstrap of a handful of pairs is overconfident
            p = max(p, mcnemar_exact(wins, losses))
    delta = float(diffs.mean())
    items = {k.split("/", 1)[0] for k in shared}
    inc_s, cand_s = _seconds(incumbent, items), _seconds(candidate, items)
    verdict: Literal["better", "cheaper", "rejected"] = "rejected"
    p_ni = None
    if delta > s.min_gain and p < s.alpha:
        verdict = "better"
    elif inc_s and cand_s is not None and cand_s <= (1 - s.cheaper) * inc_s:
        scale = abs(_mean_known(inc) or 0.0) or 1.0
        p_ni = paired_bootstrap(diffs, s.n_bootstrap, s.seed, shift=s.noninferiority_margin * scale)
        if p_ni < s.alpha:
            verdict = "cheaper"
    inc_mean, cand_mean = _mean_known(inc), _mean_known(cand)
    reason = (
        f"{'accepted' if verdict != 'rejected' else 'rejected'} ({verdict}): candidate "
        f"{_fmt(cand_mean)} vs incumbent {_fmt(inc_mean)} ({metric.name}, {metric.direction} is "
        f"better) on {len(shared)} paired {s.noise}, {wins} wins / {losses} losses, oriented "
        f"delta {delta:+.4f} (needs > {s.min_gain:g}), {test} one-sided p = {p:.4f} (needs < "
        f"{s.alpha:g})"
    )
    if p_ni is not None:
        reason += (
            f"; {_fmt(cand_s)} vs {_fmt(inc_s)} s/item, non-inferiority p = {p_ni:.4f} (margin "
            f"{s.noninferiority_margin:.0%} of the incumbent's score)"
        )
    return GateResult(
        accepted=verdict != "rejected", verdict=verdict, incumbent_score=inc_mean,
        candidate_score=cand_mean, delta=delta, p_value=p, p_noninferior=p_ni, test=test,
        n_paired=len(shared), wins=wins, losses=losses, incumbent_none=inc.count(None),
        candidate_none=cand.count(None), incumbent_seconds=inc_s, candidate_seconds=cand_s,
        reason=reason, **common,
    )  # fmt: skip


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
