"""Removing the leading principal components of a feature matrix (AV-MNIST's image weakening).

AV-MNIST (Vielzeuf et al., 2018; packaged by MultiBench, Liang et al., 2021)
weakens its MNIST images by removing 75 % of their energy with PCA. With the
fitting rows ``X`` (``(n, d)``), mean ``mu`` and covariance eigenvalues
``l_1 >= ... >= l_d`` with orthonormal eigenvectors ``v_i``, the removal keeps
the fewest leading components ``V_k = [v_1 .. v_k]`` (``(d, k)``) whose share
of the variance reaches the fraction ``f``::

    k = min { k : (l_1 + ... + l_k) / (l_1 + ... + l_d) >= f }

and maps every row ``x`` (of any split) to ``x - V_k V_k^T (x - mu)``: the
mean and the trailing components stay, the leading ``k`` are projected out.
Fit on the training rows only, so that the test rows choose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bogc_core.errors import ConfigError, ShapeError

__all__ = ["PCARemoval", "fit_pca_removal"]


@dataclass(frozen=True)
class PCARemoval:
    """The fitted removal: ``mean`` ``(d,)``, ``components`` ``(k, d)`` (orthonormal rows,
    the leading principal directions) and ``removed``, their share of the fitting rows'
    variance (``>=`` the requested fraction)."""

    mean: np.ndarray
    components: np.ndarray
    removed: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x - (x - mean) C^T C`` for rows ``x`` ``(m, d)``: a new float64 ``(m, d)`` array."""
        x = np.asarray(x, dtype=np.float64)
        d = self.mean.shape[0]
        if x.ndim != 2 or x.shape[1] != d:
            raise ShapeError(f"x: must have shape (m, {d}) like the fitting rows, got {x.shape}; "
                             f"flatten each sample to {d} features first")
        centred = x - self.mean
        return x - (centred @ self.components.T) @ self.components


def fit_pca_removal(x_fit: np.ndarray, fraction: float = 0.75) -> PCARemoval:
    """Fit the removal of the leading components carrying ``fraction`` of the variance of
    ``x_fit`` ``(n, d)`` (``n >= 2``, finite, not constant). The caller's array is only read."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise ConfigError(f"fraction: must be a number in (0, 1), got {fraction!r}; pass e.g. "
                          f"0.75 to remove the components carrying 75% of the variance")
    x = np.asarray(x_fit, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ShapeError(f"x_fit: must have shape (n, d) with n >= 2 rows, got {x.shape}; "
                         f"flatten each sample to one row")
    if not np.all(np.isfinite(x)):
        raise ConfigError("x_fit: contains NaN or infinity; impute or drop those rows first")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = np.clip(eigval[::-1], 0.0, None), eigvec[:, ::-1]
    total = float(eigval.sum())
    if total <= 0.0:
        raise ConfigError("x_fit: every feature is constant, there is no variance to remove; "
                          "pass rows that differ")
    share = np.cumsum(eigval) / total
    k = min(int(np.searchsorted(share, fraction)) + 1, eigval.size)  # first share >= fraction
    return PCARemoval(mean=mean, components=eigvec[:, :k].T.copy(), removed=float(share[k - 1]))
