"""The adaptive gate's sequential plan: boundaries from alpha spending, the false-acceptance rate
over all looks held at alpha on simulated null candidates (where looking three times at the
single-look alpha is not), and widening only while undecided."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from sialoop.gate import mcnemar_exact
from sialoop.sequential import boundaries, plan, run_looks, spent

ALPHA = 0.1


@pytest.mark.parametrize("spending", ["pocock", "obrien-fleming"])
def test_spending_reaches_alpha_and_one_look_is_the_plain_test(spending):
    assert spent(0.0, ALPHA, spending) == 0.0
    assert spent(1.0, ALPHA, spending) == pytest.approx(ALPHA)
    assert spent(0.3, ALPHA, spending) < spent(0.6, ALPHA, spending) < ALPHA
    (c,) = boundaries([1.0], ALPHA, spending)
    assert c == pytest.approx(norm.ppf(1 - ALPHA), abs=1e-6)


def test_two_look_boundaries_match_the_bivariate_normal():
    """Checked against scipy's bivariate normal CDF, independent of the grid recursion."""
    t1 = 0.4
    c1, c2 = boundaries([t1, 1.0], ALPHA, "pocock")
    assert norm.sf(c1) == pytest.approx(spent(t1, ALPHA, "pocock"), rel=1e-6)
    from scipy.stats import multivariate_normal

    rho = math.sqrt(t1)
    both_below = multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([c1, c2])
    assert 1 - both_below == pytest.approx(ALPHA, abs=2e-4)


def test_a_plan_without_room_to_widen_is_the_single_look_gate():
    assert plan(150, 150, 2, ALPHA).looks == (150,)
    assert plan(150, 150, 2, ALPHA).nominal == (ALPHA,)
    assert plan(150, 432, 0, ALPHA).nominal == (ALPHA,)
    p = plan(150, 432, 2, ALPHA)
    assert p.looks == (150, 291, 432)
    assert all(a < ALPHA for a in p.nominal)


def _simulate(seq, diffs_of, test, reps: int, seed: int) -> tuple[float, float]:
    """Share of candidates accepted and mean items looked at, over `reps` simulated candidates."""
    rng = np.random.default_rng(seed)
    accepted, items = 0, 0
    for _ in range(reps):
        d = diffs_of(rng, seq.looks[-1])

        def look(n, nominal, d=d):
            p = test(d[:n])
            return (p < nominal and d[:n].mean() > 0, p, n)

        result, _ = run_looks(seq, look, lambda r: r[0], lambda r, bound: r[1] < bound)
        accepted += result[0]
        items += result[2]
    return accepted / reps, items / reps


def _binary_null(rng, n):  # 0/1 pairs, 20% discordant, wins as likely as losses
    u = rng.random(n)
    return np.where(u < 0.1, 1.0, np.where(u < 0.2, -1.0, 0.0))


def _mcnemar(d):
    return mcnemar_exact(int(np.sum(d > 0)), int(np.sum(d < 0)))


def _z_test(d):  # the normal approximation a paired bootstrap follows
    return float(norm.sf(d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))))


def test_null_candidates_are_accepted_at_most_alpha_over_all_looks():
    reps, se = 4000, math.sqrt(ALPHA * (1 - ALPHA) / 4000)
    seq = plan(150, 432, 2, ALPHA, undecided=1.0)  # widen whenever not accepted: the worst case
    naive = seq.model_copy(update={"nominal": (ALPHA,) * len(seq.looks)})
    continuous = lambda rng, n: rng.normal(0.0, 1.0, n)  # noqa: E731

    rate, _ = _simulate(seq, continuous, _z_test, reps, seed=1)
    assert rate <= ALPHA + 3 * se, rate
    assert rate >= ALPHA - 4 * se, rate  # the plan spends its alpha, it is not merely strict
    looking_thrice, _ = _simulate(naive, continuous, _z_test, reps, seed=1)
    assert looking_thrice > ALPHA + 4 * se, looking_thrice  # what the plan prevents

    rate, _ = _simulate(seq, _binary_null, _mcnemar, reps, seed=2)
    assert rate <= ALPHA + 3 * se, rate


def test_a_small_real_gain_is_found_more_often_than_by_one_look_at_150():
    """+4 points on a 0/1 task with 20% discordant pairs: the case the issue names."""

    def gain(rng, n):
        u = rng.random(n)
        return np.where(u < 0.12, 1.0, np.where(u < 0.2, -1.0, 0.0))

    single, _ = _simulate(plan(150, 150, 0, ALPHA), gain, _mcnemar, 1500, seed=3)
    adaptive, n = _simulate(plan(150, 432, 2, ALPHA), gain, _mcnemar, 1500, seed=3)
    assert adaptive > single + 0.05, (adaptive, single)
    assert 150 < n < 432


def test_the_gate_widens_only_while_undecided():
    seq = plan(100, 300, 2, ALPHA, undecided=0.3)
    seen: list[int] = []

    def scripted(ps):
        def look(n, nominal):
            seen.append(n)
            p = ps[len(seen) - 1]
            return (p < nominal, p)

        return look

    for ps, looks in [
        ((0.001,), [100]),  # decided at once: accepted
        ((0.6,), [100]),  # decided at once: clearly not better
        ((0.2, 0.001), [100, 200]),  # undecided, then accepted
        ((0.2, 0.5), [100, 200]),  # undecided, then clearly not
        ((0.2, 0.2, 0.2), [100, 200, 300]),  # undecided to the last look: rejected there
    ]:
        seen.clear()
        result, all_looks = run_looks(
            seq, scripted(ps), lambda r: r[0], lambda r, bound: r[1] < bound
        )
        assert seen == looks and len(all_looks) == len(looks)
        assert result[0] == (ps[-1] == 0.001)
