"""Multi-modal data sets for ``bogc bench``: the shipped ones and user ``.npz`` files.

A data set file is a ``.npz`` with (API.md)

- ``y``: integer class labels, shape ``(n,)``;
- ``x_<modality>``: one array per modality, first axis ``n`` (any trailing
  shape; it is flattened to ``(n, d_m)``);
- optionally ``test_mask``: boolean ``(n,)``, True for test rows. Without it,
  a stratified 20 % of the rows (fixed seed 0) becomes the test split.

Other keys are ignored. Shipped data sets (built by ``scripts/build_data.py``,
see ``README.md`` next to this file for provenance and licences):

- ``"av-digits"``: FSDD spoken digits (log-mel) paired by class with MNIST
  images (14x14); 2700 train / 300 test; CC BY-SA 4.0 (FSDD) and CC BY-SA 3.0
  (MNIST).
- ``"mfeat"``: UCI Multiple Features, six views, 1600 train / 400 test;
  CC BY 4.0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bogc_core.errors import BOGCError, ShapeError

__all__ = ["Dataset", "load_dataset", "SHIPPED", "DataError"]

_HERE = Path(__file__).resolve().parent
SHIPPED = {"av-digits": _HERE / "av-digits.npz", "mfeat": _HERE / "mfeat.npz"}


class DataError(BOGCError):
    """A data set file is missing or does not follow the ``.npz`` format of API.md."""


@dataclass(frozen=True)
class Dataset:
    """A labelled multi-modal data set, float32 features, one array per modality.

    ``x[m]`` has shape ``(n, d_m)``; ``y`` is ``(n,)`` int64 in ``0..n_classes-1``;
    ``test_mask`` is ``(n,)`` bool. ``modalities`` keeps the file's order.
    """

    name: str
    modalities: tuple[str, ...]
    x: dict[str, np.ndarray]
    y: np.ndarray
    test_mask: np.ndarray
    n_classes: int
    split_given: bool

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def dims(self) -> dict[str, int]:
        return {m: int(self.x[m].shape[1]) for m in self.modalities}


def _default_test_mask(y: np.ndarray, frac: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        mask[idx[: max(1, int(round(frac * idx.size)))]] = True
    return mask


def load_dataset(name_or_path: str | os.PathLike) -> Dataset:
    """Load a shipped data set by name (``"av-digits"``, ``"mfeat"``) or a user ``.npz`` path.

    Raises :class:`DataError` (a :class:`bogc_core.BOGCError`) naming the
    problem and the fix when the file is missing or malformed. The caller's
    files are only read; features are returned as new float32 arrays.
    """
    key = str(name_or_path)
    path = SHIPPED.get(key.lower(), Path(key))
    if not path.is_file():
        raise DataError(
            f"name_or_path: {key!r} is neither a shipped data set {sorted(SHIPPED)} nor an "
            f"existing .npz file; pass one of those names or a path to a .npz with 'y' and "
            f"'x_<modality>' arrays"
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip/format errors come in many types
        raise DataError(f"name_or_path: {key!r} could not be read as .npz ({exc}); save it "
                        f"with numpy.savez or numpy.savez_compressed") from exc
    with npz:
        files = list(npz.files)
        if "y" not in files:
            raise DataError(f"name_or_path: {key!r} has no 'y' array (labels); keys are {files}")
        y_raw = np.asarray(npz["y"])
        mods = [k[2:] for k in files if k.startswith("x_") and len(k) > 2]
        if not mods:
            raise DataError(
                f"name_or_path: {key!r} has no modality arrays; name each one 'x_<modality>' "
                f"(keys are {files})"
            )
        x = {m: np.asarray(npz[f"x_{m}"]) for m in mods}
        mask_raw = np.asarray(npz["test_mask"]) if "test_mask" in files else None
    if y_raw.ndim != 1 and not (y_raw.ndim == 2 and y_raw.shape[1] == 1):
        raise ShapeError(f"y: must have shape (n,), got {y_raw.shape}; store one label per sample")
    y_raw = y_raw.reshape(-1)
    if not (np.issubdtype(y_raw.dtype, np.integer) or np.all(np.mod(y_raw, 1) == 0)):
        raise DataError(f"y: labels must be integers, got dtype {y_raw.dtype}; store class ids")
    classes, y = np.unique(y_raw, return_inverse=True)
    n = y.shape[0]
    feats: dict[str, np.ndarray] = {}
    for m, arr in x.items():
        if arr.ndim < 1 or arr.shape[0] != n:
            raise ShapeError(
                f"x_{m}: first axis must have the {n} samples of 'y', got shape {arr.shape}"
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(f"x_{m}: must be numeric, got dtype {arr.dtype}")
        f = arr.reshape(n, -1).astype(np.float32)
        if not np.all(np.isfinite(f)):
            raise DataError(f"x_{m}: contains NaN or infinity; impute or drop those samples")
        feats[m] = f
    if mask_raw is None:
        mask, given = _default_test_mask(y), False
    else:
        if mask_raw.shape != (n,) or mask_raw.dtype != bool:
            raise DataError(
                f"test_mask: must be a boolean array of shape ({n},), got {mask_raw.dtype} "
                f"{mask_raw.shape}; omit it to get a stratified 20% test split"
            )
        mask, given = mask_raw.copy(), True
    if mask.all() or not mask.any():
        raise DataError("test_mask: must mark some but not all samples as test")
    if classes.size < 2:
        raise DataError(f"y: needs at least two classes, got {classes.tolist()}")
    name = key.lower() if key.lower() in SHIPPED else Path(key).stem
    return Dataset(name, tuple(mods), feats, y.astype(np.int64), mask, int(classes.size), given)
