"""The denoising split and metrics on a tiny matrix: hand-computed values, the controls, and
the rule that closes the scale shortcut."""

import numpy as np
import scipy.sparse as sp

from sialoop.tasks.denoise.metrics import Controls, evaluate, log_normalised, mcv_split, poisson


def _split():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.6, 6.0, size=(40, 60))))
    return mcv_split(counts, seed=0)


def test_mcv_split_keeps_every_count_and_drops_genes_without_train_counts():
    counts = sp.csr_matrix(np.array([[5, 0, 1], [3, 0, 0], [0, 0, 2]]))
    split = mcv_split(counts, seed=3)
    assert list(split.genes) == [
        g for g in (0, 2) if split.train[:, list(split.genes).index(g)].sum()
    ]
    kept = counts[:, split.genes].toarray()
    assert np.array_equal(split.train.toarray() + split.test.toarray(), kept)
    assert (split.train.toarray() >= 0).all() and (split.test.toarray() >= 0).all()


def test_hand_computed_mse_and_poisson():
    x = np.array([[1.0, 3.0], [0.0, 2.0]])
    expected = np.log1p(np.array([[2500.0, 7500.0], [0.0, 10000.0]]))
    assert np.allclose(log_normalised(x), expected)
    test, out = np.array([[1.0, 0.0]]), np.array([[2.0, 2.0]])
    # scaled = out * 1 / 4; mean(test - scaled * log(test + 1e-6))
    want = np.mean([1 - 0.5 * np.log(1 + 1e-6), 0 - 0.5 * np.log(1e-6)])
    assert abs(poisson(test, out, train_sum=4.0) - want) < 1e-12


def test_controls_and_the_scale_shortcut():
    split = _split()
    c = Controls.of(split)
    train, test = split.train.toarray(), split.test.toarray()
    none, perfect = evaluate(train, c), evaluate(test, c)
    assert none["mse_norm"] == 0.0 and abs(perfect["mse_norm"] - 1.0) < 1e-12
    assert perfect["valid"] and perfect["poisson_norm"] > 1.0  # rescaled to train mass
    assert not none["valid"] and "poisson_norm" in none["why"]
    # At full mass our poisson is upstream's.
    full = test * (c.train_sum / test.sum())
    got = evaluate(full, c)
    assert abs(got["poisson"] - got["poisson_raw"]) < 1e-12
    # A global scale neither helps nor hurts; all zeros has no mass and is invalid.
    small = evaluate(full * 1e-3, c)
    assert small["mse_norm"] == got["mse_norm"] and abs(small["poisson"] - got["poisson"]) < 1e-9
    assert small["poisson_norm_raw"] != got["poisson_norm_raw"]
    zero = evaluate(np.zeros_like(test), c)
    assert not zero["valid"] and "zeros" in zero["why"]
    assert not evaluate(-test, c)["valid"] and not evaluate(test[:, :3], c)["valid"]
    units = got["units"]
    assert len(units) == test.shape[0]
    assert abs(np.mean(list(units.values())) - got["mse_norm"]) < 1e-9
