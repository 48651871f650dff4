"""The val gate: paired tests on the same val items, on real Trajectory records."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from sialoop.gate import GateSettings, gate
from sialoop.records import ErrorKind, RolloutError, Score, Trajectory


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


def test_an_unscored_rollout_counts_as_zero():
    inc = version(binary(20, 20))
    cand = version([None] * 10 + [1.0] * 10)
    r = gate(inc, cand)
    assert r.n_paired == 20 and r.candidate_score == 0.5 and not r.accepted


def test_nothing_paired_is_rejected_with_a_reason():
    r = gate(version(binary(5, 10), "a"), version(binary(10, 10), "b"))
    assert not r.accepted and r.n_paired == 0 and r.test == "none"
    assert "no val item" in r.reason


def test_the_margin_must_be_exceeded():
    inc, cand = binary(50), binary(60)
    assert gate(version(inc), version(cand)).accepted
    r = gate(version(inc), version(cand), GateSettings(margin=0.1))
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
