"""The PCA energy removal that weakens av-mnist's images, against closed forms and an SVD."""

from __future__ import annotations

import numpy as np
import pytest
from bogc_core.integrations.data.pca_energy import fit_pca_removal
from hypothesis import given, settings
from hypothesis import strategies as st

from bogc_core import BOGCError


def _svd_reference(x: np.ndarray, fraction: float) -> tuple[int, float, np.ndarray]:
    """Independent route: singular values of the centred rows give the variance shares."""
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    k = 1
    while share[k - 1] < fraction:
        k += 1
    return k, float(share[k - 1]), vt[:k].T @ vt[:k]  # projector onto the leading k directions


def test_known_spectrum_closed_form():
    # Rows built with exactly known covariance: eigenvalues 5, 3, 1, 1 along the columns of a
    # random rotation R. The leading two carry 8/10 = 0.8, the first alone 0.5 < 0.75.
    rng = np.random.default_rng(0)
    n, lam = 200, np.array([5.0, 3.0, 1.0, 1.0])
    z = rng.normal(size=(n, 4))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)  # orthonormal, centred columns
    r, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    mu = np.array([1.0, -2.0, 3.0, 0.5])
    x = q * np.sqrt(lam * (n - 1)) @ r.T + mu
    rem = fit_pca_removal(x, 0.75)
    assert rem.components.shape == (2, 4)
    assert rem.removed == pytest.approx(0.8, abs=1e-12)
    np.testing.assert_allclose(rem.mean, mu, atol=1e-12)
    np.testing.assert_allclose(rem.components.T @ rem.components, r[:, :2] @ r[:, :2].T,
                               atol=1e-10)
    # what remains is the mean plus the trailing two directions, unchanged
    expected = mu + (x - mu) @ r[:, 2:] @ r[:, 2:].T
    np.testing.assert_allclose(rem.apply(x), expected, atol=1e-10)
    # exactly 0.8 requested: two components still reach it
    assert fit_pca_removal(x, 0.8 - 1e-9).components.shape[0] == 2


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 30), st.integers(1, 8), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
def test_matches_svd_and_removes_at_least_the_fraction(n, d, fraction, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=d) + rng.normal(size=d)
    x_copy = x.copy()
    rem = fit_pca_removal(x, fraction)
    np.testing.assert_array_equal(x, x_copy)  # the caller's array is only read
    k, share, projector = _svd_reference(x, fraction)
    out = rem.apply(x)
    centred = x - x.mean(axis=0)
    removed_energy = np.sum((centred - (out - rem.mean)) ** 2) / np.sum(centred**2)
    assert removed_energy >= fraction - 1e-9
    assert removed_energy == pytest.approx(rem.removed, abs=1e-9)
    # ties between eigenvalues at the cut could reorder directions; random data has none
    assert rem.components.shape[0] == k and rem.removed == pytest.approx(share, abs=1e-9)
    np.testing.assert_allclose(rem.components.T @ rem.components, projector, atol=1e-7)
    np.testing.assert_allclose(rem.components @ rem.components.T, np.eye(k), atol=1e-9)
    # what remains is orthogonal to every removed direction, and removing again changes nothing
    np.testing.assert_allclose((out - rem.mean) @ rem.components.T, 0.0, atol=1e-8)
    np.testing.assert_allclose(rem.apply(out), out, atol=1e-8)


def test_new_rows_use_the_fitted_mean_and_directions():
    rng = np.random.default_rng(3)
    fit, new = rng.normal(size=(50, 6)) * np.arange(1, 7), rng.normal(size=(7, 6))
    rem = fit_pca_removal(fit, 0.75)
    c = rem.components
    np.testing.assert_allclose(rem.apply(new), new - (new - fit.mean(0)) @ c.T @ c, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan"), "0.5"])
def test_bad_fraction_is_named(fraction):
    with pytest.raises(BOGCError, match="fraction"):
        fit_pca_removal(np.eye(4), fraction)


@pytest.mark.parametrize("x", [np.ones((1, 3)), np.ones(5), np.ones((4, 3)),
                               np.array([[1.0, np.nan], [2.0, 3.0]])])
def test_bad_rows_are_named(x):
    with pytest.raises(BOGCError, match="x_fit"):
        fit_pca_removal(x, 0.5)


def test_apply_refuses_other_widths():
    rem = fit_pca_removal(np.random.default_rng(0).normal(size=(10, 3)), 0.5)
    with pytest.raises(BOGCError, match=r"x: must have shape \(m, 3\)"):
        rem.apply(np.ones((2, 4)))
