"""The val gate: paired tests on the same val items, on real Trajectory records."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from sialoop.gate import GateSettings, gate
from sialoop.records import ErrorKind, RolloutError, Score, Trajectory
from sialoop.tasks.base import Metric


def rollout(iid: str, value: float | None, version: str = "v") -> Trajectory:
    """A val rollout; `value` None is a rollout that failed and was never scored."""
    common = {"run_id": "r", "version_id": version, "split": "val", "instance_id": iid}
    if value is None:
        err = RolloutError(kind=ErrorKind.crash, message="boom")
        return Trajectory(**common, error=err, seconds=1.0)
    score = Score(value=value, correct=value == 1.0 if value in (0.0, 1.0) else None)
    return Trajectory(**common, output="x", score=score, seconds=1.0)


def version(values, prefix: str = "i") -> list[Trajectory]:
    return [rollout(f"{prefix}{i}", v) for i, v in enumerate(values)]


def binary(n_right: int, n: int = 100) -> list[float]:
    return [1.0] * n_right + [0.0] * (n - n_right)


def test_a_clearly_better_candidate_is_accepted():
    inc = binary(50)
    cand = inc[:]
    for i in range(50, 75):  # fixes 25 items the incumbent got wrong
        cand[i] = 1.0
    cand[0] = cand[1] = 0.0  # and breaks 2
    r = gate(version(inc), version(cand))
    assert r.accepted and r.test == "mcnemar-exact"
    assert r.n_paired == 100
    assert r.delta == pytest.approx(0.23)
    assert r.p_value < 1e-4
    assert r.p_value == pytest.approx(binomtest(25, 27, 0.5, alternative="greater").pvalue)
    assert "accepted" in r.reason


def test_an_equal_candidate_is_rejected():
    r = gate(version(binary(60)), version(binary(60)))
    assert not r.accepted and r.delta == 0.0 and r.p_value == 1.0


def test_a_same_score_candidate_with_different_answers_is_rejected():
    inc = binary(60)
    cand = inc[::-1]  # 60 right again, but on other items
    r = gate(version(inc), version(cand))
    assert not r.accepted and r.delta == pytest.approx(0.0) and r.p_value > 0.5


def test_a_worse_candidate_is_rejected():
    r = gate(version(binary(70)), version(binary(50)))
    assert not r.accepted and r.delta == pytest.approx(-0.2) and r.p_value > 0.99


def test_a_small_noisy_gain_is_rejected():
    inc, cand = binary(50), binary(52)
    r = gate(version(inc), version(cand))  # 2 discordant pairs: p = 0.25
    assert not r.accepted and r.delta > 0 and r.p_value == pytest.approx(0.25)


def test_pairing_ignores_items_only_one_side_has():
    inc = version(binary(10, 20))
    cand = version(binary(20, 20))
    extra_cand = [rollout(f"extra{i}", 1.0) for i in range(50)]
    extra_inc = [rollout(f"only{i}", 0.0) for i in range(30)]
    r = gate(inc + extra_inc, cand[:15] + extra_cand)
    assert r.n_paired == 15
    assert r.incumbent_score == pytest.approx(10 / 15) and r.candidate_score == 1.0
    assert r.p_value == pytest.approx(0.5**5)


def test_an_unscored_rollout_is_a_loss_never_dropped():
    inc = version(binary(20, 20))
    cand = version([None] * 10 + [1.0] * 10)
    r = gate(inc, cand)
    assert r.n_paired == 20 and r.losses == 10 and r.candidate_none == 10 and not r.accepted
    assert r.delta == pytest.approx(-0.5)  # a None loses by the full range, 1 for 0/1 scores
    # and a wrong answer beats an unscored one
    r = gate(version([None] * 20), version(binary(0, 20)))
    assert r.wins == 20 and r.accepted


LOWER = Metric(name="seconds", direction="lower")


def test_lower_is_better_accepts_a_faster_candidate_and_rejects_a_slower_one():
    rng = np.random.default_rng(2)
    slow = rng.uniform(2.0, 3.0, size=40)
    fast = slow * 0.8
    r = gate(version(slow.tolist()), version(fast.tolist()), metric=LOWER)
    assert r.accepted and r.verdict == "better" and r.delta > 0 and r.direction == "lower"
    r = gate(version(fast.tolist()), version(slow.tolist()), metric=LOWER)
    assert not r.accepted and r.delta < 0
    # higher-is-better would have read the same numbers the other way round
    assert gate(version(fast.tolist()), version(slow.tolist())).accepted


def test_zero_is_not_a_free_win_for_a_lower_is_better_metric():
    inc = version([1.0] * 30)
    cand = version([None] * 30)  # never computed: not 0 seconds
    r = gate(inc, cand, metric=LOWER)
    assert not r.accepted and r.losses == 30 and r.candidate_score is None


def test_units_pair_repeated_measurements_of_few_items():
    def timed(iid: str, times: list[float]) -> Trajectory:
        units = {f"rep{k}": t for k, t in enumerate(times)}
        score = Score(value=float(np.mean(times)), detail={"units": units})
        return Trajectory(
            run_id="r", version_id="v", split="val", instance_id=iid, output="x", score=score,
            seconds=1.0,
        )  # fmt: skip

    rng = np.random.default_rng(3)
    base = [rng.normal(10.0, 0.5, size=10) for _ in range(2)]
    inc = [timed(f"s{i}", b.tolist()) for i, b in enumerate(base)]
    cand = [timed(f"s{i}", (b - 0.6).tolist()) for i, b in enumerate(base)]
    items = gate(inc, cand, GateSettings(noise="items"), metric=LOWER)
    units = gate(inc, cand, GateSettings(noise="units"), metric=LOWER)
    assert items.n_paired == 2 and not items.accepted  # two items cannot show it
    assert units.n_paired == 20 and units.accepted
    # an item one side failed loses each unit the other side scored on it, in either
    # direction: a scored version beats a failed incumbent (lower-is-better times here, higher-
    # is-better per-cell errors in the denoising task's loop test)
    failed = [rollout(f"s{i}", None) for i in range(2)]
    over_failed = gate(failed, cand, GateSettings(noise="units"), metric=LOWER)
    assert over_failed.accepted and over_failed.n_paired == 20
    assert over_failed.incumbent_none == 20 and over_failed.wins == 20
    worse = gate(inc, failed, GateSettings(noise="units"), metric=LOWER)
    assert not worse.accepted and worse.losses == 20 and worse.candidate_none == 20


def test_a_cheaper_candidate_that_is_not_worse_is_accepted():
    inc = version(binary(60))
    cand = [t.model_copy(update={"seconds": 0.5}) for t in version(binary(60))]
    r = gate(inc, cand)
    assert r.accepted and r.verdict == "cheaper" and r.p_noninferior is not None
    assert r.candidate_seconds == 0.5 and r.incumbent_seconds == 1.0
    worse = [t.model_copy(update={"seconds": 0.5}) for t in version(binary(40))]
    assert not gate(inc, worse).accepted
    barely = [t.model_copy(update={"seconds": 0.9}) for t in version(binary(60))]
    assert not gate(inc, barely).accepted  # 10% cheaper is not "clearly" (default 20%)


def test_the_scorer_running_a_program_counts_in_its_cost():
    # a program task: the harness only writes the program; running it is the scorer's
    def ran(trajectories, seconds):
        return [
            t.model_copy(
                update={"seconds": 0.01, "score": t.score.model_copy(update={"seconds": seconds})}
            )
            for t in trajectories
        ]

    inc, fast = ran(version(binary(60)), 5.0), ran(version(binary(60)), 2.0)
    r = gate(inc, fast)
    assert r.accepted and r.verdict == "cheaper"
    assert r.candidate_seconds == pytest.approx(2.01) and r.incumbent_seconds == pytest.approx(5.01)
    assert not gate(fast, inc).accepted  # the same harness seconds: slower to run is no gain


def test_nothing_paired_is_rejected_with_a_reason():
    r = gate(version(binary(5, 10), "a"), version(binary(10, 10), "b"))
    assert not r.accepted and r.n_paired == 0 and r.test == "none"
    assert "no val item" in r.reason


def test_the_margin_must_be_exceeded():
    inc, cand = binary(50), binary(60)
    assert gate(version(inc), version(cand)).accepted
    r = gate(version(inc), version(cand), GateSettings(min_gain=0.1))
    assert not r.accepted and r.delta == pytest.approx(0.1)


def test_continuous_scores_use_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, size=80)
    better = np.clip(base + rng.normal(0.05, 0.03, size=80), 0, 1)
    r = gate(version(base.tolist()), version(better.tolist()))
    assert r.test == "paired-bootstrap" and r.accepted and r.p_value < 0.01
    again = gate(version(base.tolist()), version(better.tolist()))
    assert again.p_value == r.p_value  # seeded
    worse = gate(version(better.tolist()), version(base.tolist()))
    assert worse.test == "paired-bootstrap" and not worse.accepted and worse.p_value > 0.99
    same = gate(version(base.tolist()), version(base.tolist()))
    assert not same.accepted and same.p_value == 1.0
