"""The denoising split and metrics, as OpenProblems defines them, and the rule that closes the
scale shortcut (see ../shared/data/scrna/METRICS.md for the upstream reading).

- `mcv_split`: molecular cross-validation. Every non-zero count u becomes train ~ Binomial(u,
  0.9) and test = u - train (numpy's RandomState(seed) over the sparse data array, as upstream
  v2); genes with no train count are dropped from both halves.
- `mse`: each cell of the held-out counts and of the output scaled to 10,000 (scanpy's
  normalize_total: an empty cell stays empty), log1p, mean squared difference. Per cell, so a
  paired test can run over cells.
- `poisson`: upstream's call, argument order included: the output scaled by test.sum() /
  train.sum(), then mean(test - scaled * log(test + 1e-6)).
- `evaluate`: both, normalised by the no-denoising (train counts) and perfect (test counts)
  controls computed on the same split, and validity under our rule: the output's poisson is
  computed on it rescaled to the train matrix's mass, so a global scale can neither help nor
  hurt; valid means finite, non-negative, the right shape, some mass, and poisson_norm >= 0.97
  at that mass. Upstream's own (unrescaled, two-sided) validity and the raw mass ratio are
  reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4
EPS = 1e-6  # upstream's poisson_nll_loss offset
VALID_POISSON_NORM = 0.97


@dataclass(frozen=True)
class Split:
    train: sp.csr_matrix  # int counts, cells x kept genes
    test: sp.csr_matrix
    genes: np.ndarray  # indices of the kept genes in the input


def mcv_split(counts: sp.spmatrix, seed: int, fraction: float = 0.9) -> Split:
    """Molecular cross-validation of integer counts (cells x genes), seeded."""
    x = sp.csr_matrix(counts, dtype=np.int64)
    x.sum_duplicates()
    rng = np.random.RandomState(seed)
    train_data = rng.binomial(x.data, fraction)
    train = sp.csr_matrix((train_data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    test = sp.csr_matrix((x.data - train_data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    keep = np.flatnonzero(np.asarray(train.sum(axis=0)).ravel() > 0)
    train, test = train[:, keep], test[:, keep]
    train.eliminate_zeros()
    test.eliminate_zeros()
    return Split(train=sp.csr_matrix(train), test=sp.csr_matrix(test), genes=keep)


def dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def log_normalised(x: np.ndarray) -> np.ndarray:
    """scanpy.pp.normalize_total(target_sum=1e4) then log1p, per cell (rows)."""
    totals = x.sum(axis=1, keepdims=True)
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(x * scale)


def mse_per_cell(test_log: np.ndarray, output: np.ndarray) -> np.ndarray:
    return np.mean((test_log - log_normalised(output)) ** 2, axis=1)


def poisson(
    test: np.ndarray, output: np.ndarray, train_sum: float, log_test: np.ndarray | None = None
) -> float:
    """Upstream's poisson: test counts in the prediction slot, the scaled output in the
    target slot (mean(y_pred - y_true * log(y_pred + eps)) with y_pred = test). `log_test`:
    log(test + eps) when the caller has it already."""
    scaled = output * (test.sum() / train_sum)
    logs = np.log(test + EPS) if log_test is None else log_test
    return float(np.mean(test - scaled * logs))


@dataclass
class Controls:
    """What the no-denoising and perfect controls score on one split."""

    test: np.ndarray
    test_log: np.ndarray
    log_test: np.ndarray  # log(test + eps), poisson's weights: computed once per split
    train_sum: float
    baseline_mse: float
    perfect_mse: float
    baseline_poisson: float
    perfect_poisson: float
    baseline_mse_per_cell: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, split: Split) -> Controls:
        train, test = dense(split.train), dense(split.test)
        test_log, log_test = log_normalised(test), np.log(test + EPS)
        train_sum = float(train.sum())
        per_cell = mse_per_cell(test_log, train)
        return cls(
            test=test, test_log=test_log, log_test=log_test, train_sum=train_sum,
            baseline_mse=float(per_cell.mean()),
            perfect_mse=float(mse_per_cell(test_log, test).mean()),
            baseline_poisson=poisson(test, train, train_sum, log_test),
            perfect_poisson=poisson(test, test, train_sum, log_test),
            baseline_mse_per_cell=per_cell,
        )  # fmt: skip

    def mse_norm(self, mse: float) -> float:
        span = self.baseline_mse - self.perfect_mse
        return float(np.clip((self.baseline_mse - mse) / span, 0.0, 1.0))

    def poisson_norm(self, value: float) -> float:
        span = self.baseline_poisson - self.perfect_poisson
        return float((self.baseline_poisson - value) / span)


def evaluate(output: Any, controls: Controls) -> dict[str, Any]:
    """Every figure of one output against one split's held-out half. `valid` and `why` apply
    our rule; `units` are per-cell mse_norm contributions (their mean is the unclipped
    mse_norm), for the gate's paired test over cells."""
    shape = controls.test.shape
    try:
        d = np.asarray(output, dtype=np.float64)
    except (TypeError, ValueError) as err:
        return {"valid": False, "why": f"the output is not a numeric matrix: {err}"}
    if d.shape != shape:
        return {"valid": False, "why": f"the output has shape {list(d.shape)}, not {list(shape)}"}
    if not np.isfinite(d).all():
        return {"valid": False, "why": f"the output holds {int((~np.isfinite(d)).sum())} NaN/inf"}
    if (d < 0).any():
        return {"valid": False, "why": f"the output holds {int((d < 0).sum())} negative values"}
    mass = float(d.sum())
    if mass <= 0:
        return {"valid": False, "why": "the output is all zeros: it has no mass to rescale"}
    per_cell = mse_per_cell(controls.test_log, d)
    mse = float(per_cell.mean())
    span = controls.baseline_mse - controls.perfect_mse
    raw_poisson = poisson(controls.test, d, controls.train_sum, controls.log_test)
    rescaled = poisson(
        controls.test, d * (controls.train_sum / mass), controls.train_sum, controls.log_test
    )
    pn, pn_raw = controls.poisson_norm(rescaled), controls.poisson_norm(raw_poisson)
    valid = pn >= VALID_POISSON_NORM
    upstream_valid = (
        pn_raw >= VALID_POISSON_NORM and raw_poisson >= controls.perfect_poisson
        and float(d.max()) <= controls.train_sum
    )  # fmt: skip
    why = None if valid else (
        f"poisson_norm {pn:.4f} < {VALID_POISSON_NORM} at the train matrix's mass "
        f"(mse_norm would be {controls.mse_norm(mse):.4f}; raw mass ratio {mass / controls.train_sum:.4g})"
    )  # fmt: skip
    return {
        "valid": valid, "why": why, "mse": mse, "mse_norm": controls.mse_norm(mse),
        "poisson": rescaled, "poisson_norm": pn,
        "poisson_raw": raw_poisson, "poisson_norm_raw": pn_raw, "upstream_valid": upstream_valid,
        "mass_ratio": mass / controls.train_sum,
        "units": {
            f"cell{c}": float((controls.baseline_mse_per_cell[c] - m) / span)
            for c, m in enumerate(per_cell)
        },
    }  # fmt: skip
