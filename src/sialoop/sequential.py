"""The adaptive gate's group-sequential plan: when a candidate is undecided on the first val
sample, both versions are scored on more val items and the gate looks again, at a nominal
alpha per look chosen so that the chance of ever accepting a candidate that is no better stays
at `alpha` over all looks.

Looks are planned before any score is seen: the first at the val subset's n, then evenly spaced
up to `n_max` (every val item the search may use: the holdout stays unseen). The information
fraction of look k is t_k = n_k / n_max. An alpha-spending function alpha(t) (Lan and DeMets)
gives the false-acceptance probability allowed by look k; the boundary c_k on the one-sided z
statistic solves P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = alpha(t_k) - alpha(t_{k-1})
under the null, with Z_k the standardised partial sum of a Brownian motion (corr(Z_j, Z_k) =
sqrt(t_j / t_k)), computed by numerical integration on a grid (Armitage, McPherson and Rowe).
The nominal alpha of look k is 1 - Phi(c_k): the gate's own test (exact McNemar, or the paired
bootstrap) accepts at look k when its p is below it.

Spending functions: "pocock" alpha * ln(1 + (e - 1) t) spends early (the first look keeps most of
its power); "obrien-fleming" 2 - 2 Phi(z_{alpha/2} / sqrt(t)) keeps almost all alpha for the last.

Stopping for futility (p at or above `undecided`, so no widening) only lowers the chance of a
false acceptance, so the bound holds with it. The exact McNemar test is conservative at a given
nominal level, so the bound holds for 0/1 scores too; the bootstrap's p follows the normal
approximation the plan uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.optimize import brentq
from scipy.stats import norm

Spending = Literal["pocock", "obrien-fleming"]
_GRID = 1201  # points of the sub-density grid; boundaries agree to ~1e-6 with finer grids
_LOW = -10.0  # the grid's lower end, in units of the Brownian motion's sd
R = TypeVar("R")


class SequentialPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    looks: tuple[int, ...]  # val items at each look
    nominal: tuple[float, ...]  # the alpha a look's p must be below to accept
    alpha: float  # the overall false-acceptance bound
    spending: Spending
    undecided: float  # p below this (and not accepted) widens to the next look


def spent(t: float, alpha: float, spending: Spending) -> float:
    """The false-acceptance probability allowed by information fraction t."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "pocock":
        return alpha * math.log(1 + (math.e - 1) * t)
    return float(2 - 2 * norm.cdf(norm.ppf(1 - alpha / 2) / math.sqrt(t)))


def boundaries(fractions: list[float], alpha: float, spending: Spending) -> list[float]:
    """The z boundary c_k of each look at the given information fractions (increasing, last
    1), from the spending function."""
    out: list[float] = []
    grid: np.ndarray | None = None  # values of the Brownian motion S_k = Z_k sqrt(t_k)
    density: np.ndarray | None = None  # its sub-density on paths that never crossed
    previous_t, previous_spent = 0.0, 0.0
    for t in fractions:
        step = t - previous_t
        target = spent(t, alpha, spending) - previous_spent
        c = brentq(
            lambda c, *a: _crossing(c, *a) - target,  # noqa: B023 (called at once)
            -10.0, 40.0, args=(t, step, grid, density), xtol=1e-10,
        )  # fmt: skip
        out.append(c)
        bound = c * math.sqrt(t)
        new_grid = np.linspace(_LOW * math.sqrt(t), bound, _GRID)
        if density is None:
            new_density = norm.pdf(new_grid / math.sqrt(t)) / math.sqrt(t)
        else:
            kernel = norm.pdf((new_grid[:, None] - grid[None, :]) / math.sqrt(step))
            new_density = np.trapezoid(kernel * density[None, :], grid, axis=1) / math.sqrt(step)
        grid, density = new_grid, new_density
        previous_t, previous_spent = t, previous_spent + target
    return out


def _crossing(
    c: float, t: float, step: float, grid: np.ndarray | None, density: np.ndarray | None
) -> float:
    """P(no crossing before, Z >= c at fraction t), from the previous look's sub-density."""
    if grid is None or density is None:
        return float(norm.sf(c))
    return float(np.trapezoid(density * norm.sf((c * math.sqrt(t) - grid) / math.sqrt(step)), grid))


def plan(
    n_first: int,
    n_max: int,
    extra_looks: int,
    alpha: float,
    spending: Spending = "pocock",
    undecided: float = 0.3,
) -> SequentialPlan:
    """Looks at n_first and `extra_looks` more, evenly spaced up to n_max. Without room to
    widen it is the single-look gate at `alpha`."""
    if extra_looks <= 0 or n_max <= n_first or n_first <= 0:
        return SequentialPlan(
            looks=(n_first,), nominal=(alpha,), alpha=alpha, spending=spending, undecided=0.0
        )
    looks = [n_first + round((n_max - n_first) * k / extra_looks) for k in range(extra_looks + 1)]
    looks = sorted(set(looks))
    cs = boundaries([n / n_max for n in looks], alpha, spending)
    nominal = tuple(float(norm.sf(c)) for c in cs)
    return SequentialPlan(
        looks=tuple(looks), nominal=nominal, alpha=alpha, spending=spending, undecided=undecided
    )


def run_looks(
    seq: SequentialPlan, look: Callable[[int, float], R], accepted: Callable[[R], bool],
    undecided: Callable[[R, float], bool],
) -> tuple[R, list[R]]:  # fmt: skip
    """Look at each planned n in turn (`look(n, nominal_alpha)`), stopping at the first
    acceptance, at a look that is not undecided, or at the last look."""
    results: list[R] = []
    for k, (n, nominal) in enumerate(zip(seq.looks, seq.nominal, strict=True)):
        result = look(n, nominal)
        results.append(result)
        last = k == len(seq.looks) - 1
        if accepted(result) or last or not undecided(result, seq.undecided):
            return result, results
    raise AssertionError("a plan has at least one look")
