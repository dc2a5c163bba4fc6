"""Multi-modal data sets for ``bogc bench``: the shipped ones and user ``.npz`` files.

A data set file is a ``.npz`` archive (written by ``numpy.savez``) with

- ``y``: class labels, shape ``(n,)`` (or ``(n, 1)``): integers, whole-valued
  floats, booleans or strings. Labels are mapped to class ids ``0..C-1`` in
  sorted order (so ``["cat", "dog"]`` become 0 and 1; the original labels are
  kept in :attr:`Dataset.classes`);
- ``x_<modality>``: one real numeric array per modality, first axis ``n``
  (any trailing shape; it is flattened to ``(n, d_m)`` with ``d_m >= 1``),
  finite in float32;
- optionally ``test_mask``: boolean ``(n,)``, True for test rows. Without it,
  a stratified 20 % of the rows (fixed seed 0) becomes the test split.

Other keys are ignored. Every class needs at least :data:`MIN_TRAIN_PER_CLASS`
training rows and :data:`MIN_TEST_PER_CLASS` test row (a fifth of the training
rows is carved off for validation, and every training step draws a batch of
several examples per source). Files are read with ``allow_pickle=False``:
object arrays are refused, never unpickled. ``bogc data check FILE.npz``
reports what a file holds, or which key is wrong and how to fix it.

Shipped data sets (built by ``scripts/build_data.py``, see ``README.md`` next
to this file for provenance and licences):

- ``"av-mnist"`` (the default of ``bogc bench``): the av-digits pairs made
  hard the AV-MNIST way: 75 % of the images' PCA energy removed (fitted on the
  training rows), white noise at -10 dB SNR added to every clip before its
  log-mel spectrogram; 2700 train / 300 test; CC BY-SA 4.0 (FSDD) and
  CC BY-SA 3.0 (MNIST).
- ``"av-digits"``: FSDD spoken digits (log-mel) paired by class with MNIST
  images (14x14); 2700 train / 300 test; CC BY-SA 4.0 (FSDD) and CC BY-SA 3.0
  (MNIST).
- ``"mfeat"``: UCI Multiple Features, six views, 1600 train / 400 test;
  CC BY 4.0.
"""

from __future__ import annotations

import difflib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bogc_core.errors import BOGCError, ShapeError

__all__ = [
    "Dataset",
    "load_dataset",
    "SHIPPED",
    "DataError",
    "MIN_TRAIN_PER_CLASS",
    "MIN_TEST_PER_CLASS",
]

_HERE = Path(__file__).resolve().parent
SHIPPED = {"av-mnist": _HERE / "av-mnist.npz", "av-digits": _HERE / "av-digits.npz",
           "mfeat": _HERE / "mfeat.npz"}

#: fewest training (non-test) rows per class: after the 20 % validation carve at
#: least four remain, enough for the per-source statistics of a training step
MIN_TRAIN_PER_CLASS = 5
#: fewest test rows per class, so that every class is scored
MIN_TEST_PER_CLASS = 1

# Every .npz is a zip archive; a zip archive starts with a local file header
# (or, when empty, with the end-of-central-directory record).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


class DataError(BOGCError):
    """A data set file is missing or does not follow the ``.npz`` format described above."""


@dataclass(frozen=True)
class Dataset:
    """A labelled multi-modal data set, float32 features, one array per modality.

    ``x[m]`` has shape ``(n, d_m)``; ``y`` is ``(n,)`` int64 in ``0..n_classes-1``;
    ``test_mask`` is ``(n,)`` bool. ``modalities`` keeps the file's order.
    ``classes[c]`` is the label the file used for class id ``c``.
    """

    name: str
    modalities: tuple[str, ...]
    x: dict[str, np.ndarray]
    y: np.ndarray
    test_mask: np.ndarray
    n_classes: int
    split_given: bool
    classes: tuple[Any, ...] = ()

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def dims(self) -> dict[str, int]:
        return {m: int(self.x[m].shape[1]) for m in self.modalities}


def _default_test_mask(y: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """A stratified test mask: ``max(1, round(frac * n_c))`` random rows of each class ``c``.

    One generator (seed 0) permutes each class's rows in turn, in class order.
    The rows are grouped by one stable sort, so a million classes cost one
    permutation each, not a pass over ``y`` each.
    """
    rng = np.random.default_rng(0)
    mask = np.zeros(y.shape[0], dtype=bool)
    order = np.argsort(y, kind="stable")  # each class's rows in increasing order
    starts = np.flatnonzero(np.r_[True, y[order][1:] != y[order][:-1]])
    for idx in np.split(order, starts[1:]):
        idx = rng.permutation(idx)
        mask[idx[: max(1, int(round(frac * idx.size)))]] = True
    return mask


def _open(path: Path, key: str, argument: str) -> Any:
    """``np.load`` of a ``.npz`` that is known to be a zip archive, pickles refused."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DataError(f"{argument}: {key!r} cannot be read ({exc.strerror or exc}); "
                        f"check the file's permissions") from exc
    if magic.startswith(_NPY_MAGIC):
        raise DataError(f"{argument}: {key!r} is a single .npy array, not a .npz archive; "
                        f"save the labels and features together with "
                        f"numpy.savez(path, y=..., x_<modality>=...)")
    if not magic.startswith(_ZIP_MAGIC):
        raise DataError(f"{argument}: {key!r} is not a .npz archive (it does not start like a "
                        f"zip file, e.g. it is text or a pickle); save it with numpy.savez or "
                        f"numpy.savez_compressed")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{argument}: {key!r} is a damaged .npz archive ({exc}); save it again "
                        f"with numpy.savez or numpy.savez_compressed") from exc


def _array(npz: Any, k: str, key: str) -> np.ndarray:
    """One member of the archive; a pickled (object) member is refused, never unpickled."""
    try:
        return np.asarray(npz[k])
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(
                f"{k}: is stored as a pickled object array, which bogc never loads (unpickling "
                f"runs code from the file); store a plain numeric array instead, e.g. "
                f"np.asarray(values, dtype=np.float32) (strings for 'y')"
            ) from exc
        raise DataError(f"{k}: cannot be read from {key!r} ({exc}); save the file again with "
                        f"numpy.savez") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{k}: cannot be read from {key!r}, the archive is damaged ({exc}); "
                        f"save the file again with numpy.savez") from exc


def _labels(y_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids ``0..C-1`` (sorted order of the labels) and the labels themselves."""
    if y_raw.ndim != 1 and not (y_raw.ndim == 2 and y_raw.shape[1] == 1):
        raise ShapeError(f"y: must have shape (n,), got {y_raw.shape}; store one label per sample")
    y_raw = y_raw.reshape(-1)
    kind = y_raw.dtype.kind
    if kind in "US":
        pass  # string labels name the classes; they are mapped to ids below
    elif kind in "biu":
        pass
    elif kind == "f":
        if not np.all(np.isfinite(y_raw)) or not np.all(np.mod(y_raw, 1) == 0):
            raise DataError(f"y: float labels must be whole numbers, got dtype {y_raw.dtype} with "
                            f"fractional, NaN or infinite values; store integer class ids or "
                            f"strings")
    else:
        raise DataError(f"y: labels of dtype {y_raw.dtype} are not supported; store integer "
                        f"class ids or strings")
    classes, y = np.unique(y_raw, return_inverse=True)
    return y.reshape(-1).astype(np.int64), classes


def _features(m: str, arr: np.ndarray, n: int) -> np.ndarray:
    """``x_<m>`` checked and flattened to a new float32 ``(n, d_m)`` array."""
    if arr.ndim < 1 or arr.shape[0] != n:
        raise ShapeError(f"x_{m}: first axis must have the {n} samples of 'y', got shape "
                         f"{arr.shape}; store samples on the first axis")
    if arr.dtype.kind == "c":
        raise DataError(f"x_{m}: complex features are not supported (the imaginary part would be "
                        f"lost); store real features, e.g. np.concatenate([x.real, x.imag], "
                        f"axis=-1) or np.abs(x)")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"x_{m}: must be a real numeric array, got dtype {arr.dtype}; convert it "
                        f"with np.asarray(x, dtype=np.float32)")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are refused below
        f = arr.reshape(n, -1).astype(np.float32)
    if f.shape[1] == 0:
        raise ShapeError(f"x_{m}: has no features (shape {arr.shape}); drop the key or store at "
                         f"least one feature per sample")
    if not np.all(np.isfinite(f)):
        raise DataError(f"x_{m}: contains NaN or infinity (or values beyond the float32 range "
                        f"+-3.4e38); impute or drop those samples, or rescale the features")
    return f


def _rows(k: int) -> str:
    return f"{k} row" if k == 1 else f"{k} rows"


def _check_class_sizes(y: np.ndarray, classes: np.ndarray) -> None:
    """Refuse classes too small for any split, before a split is drawn (one pass over ``y``).

    A class needs :data:`MIN_TRAIN_PER_CLASS` training and :data:`MIN_TEST_PER_CLASS`
    test rows whatever ``test_mask`` says, so a smaller one is a fault of ``y``.
    """
    least = MIN_TRAIN_PER_CLASS + MIN_TEST_PER_CLASS
    sizes = np.bincount(y, minlength=classes.size)
    small = np.flatnonzero(sizes < least)
    if small.size == 0:
        return
    c = int(small[0])
    head = (f"y: class {classes[c].item()!r} has {_rows(int(sizes[c]))}, fewer than the {least} "
            f"each class needs ({MIN_TRAIN_PER_CLASS} training rows and {MIN_TEST_PER_CLASS} test "
            f"row)")
    if small.size > 1:
        head += f"; {small.size} of the {classes.size} classes are that small"
    if 2 * int(np.count_nonzero(sizes == 1)) > classes.size:
        raise DataError(f"{head}. Most labels occur on one row only, so 'y' looks like sample "
                        f"ids rather than class labels; store each row's class label in 'y'")
    raise DataError(f"{head}; add samples to the small classes or drop them")


def load_dataset(name_or_path: str | os.PathLike, *, argument: str = "name_or_path") -> Dataset:
    """Load a shipped data set by name (``"av-mnist"``, ``"av-digits"``, ``"mfeat"``) or a user
    ``.npz`` path.

    Raises :class:`DataError` or :class:`~bogc_core.errors.ShapeError` (both
    :class:`bogc_core.BOGCError`) naming the key at fault and the fix when the
    file is missing, is not a ``.npz``, holds pickled objects, complex or
    non-finite features, mismatched sample counts, or too few rows per class.
    The caller's files are only read; features are returned as new float32 arrays.
    ``argument`` is the name the messages give the first argument (the command
    line passes ``--dataset``).
    """
    key = str(name_or_path)
    path = SHIPPED.get(key.lower(), Path(key))
    if not path.is_file():
        what = "is a folder, not" if path.is_dir() else "is neither a shipped data set " \
            f"{sorted(SHIPPED)} nor"
        close = difflib.get_close_matches(key.lower(), list(SHIPPED), n=1)
        hint = f"did you mean {close[0]!r}? " if close and not path.is_dir() else ""
        raise DataError(
            f"{argument}: {key!r} {what} an existing .npz file; {hint}pass one of "
            f"{sorted(SHIPPED)} or the path of a .npz file with 'y' and 'x_<modality>' arrays"
        )
    with _open(path, key, argument) as npz:
        files = list(npz.files)
        if "y" not in files:
            raise DataError(f"y: {key!r} has no 'y' array (labels); keys are {files}; store the "
                            f"labels as 'y'")
        mods = [k[2:] for k in files if k.startswith("x_") and len(k) > 2]
        if not mods:
            raise DataError(
                f"x_<modality>: {key!r} has no modality arrays; name each one 'x_<modality>' "
                f"(keys are {files})"
            )
        y_raw = _array(npz, "y", key)
        x = {m: _array(npz, f"x_{m}", key) for m in mods}
        mask_raw = _array(npz, "test_mask", key) if "test_mask" in files else None
    y, classes = _labels(y_raw)
    n = y.shape[0]
    feats = {m: _features(m, arr, n) for m, arr in x.items()}
    if classes.size < 2:
        raise DataError(f"y: needs at least two classes, got {classes.tolist()}; a classifier "
                        f"needs samples of two or more labels")
    if mask_raw is not None and (mask_raw.shape != (n,) or mask_raw.dtype != bool):
        raise DataError(
            f"test_mask: must be a boolean array of shape ({n},), got {mask_raw.dtype} "
            f"{mask_raw.shape}; omit it to get a stratified 20% test split"
        )
    _check_class_sizes(y, classes)
    if mask_raw is None:
        mask, given = _default_test_mask(y), False
    else:
        mask, given = mask_raw.copy(), True
    if mask.all() or not mask.any():
        raise DataError("test_mask: must mark some but not all samples as test; omit it to get "
                        "a stratified 20% test split")
    n_train = np.bincount(y[~mask], minlength=classes.size)
    n_test = np.bincount(y[mask], minlength=classes.size)
    for what, counts, least in (("training", n_train, MIN_TRAIN_PER_CLASS),
                                ("test", n_test, MIN_TEST_PER_CLASS)):
        if counts.min() < least:
            c = int(np.argmin(counts))
            src = "test_mask" if given else "y"
            raise DataError(
                f"{src}: class {classes[c].item()!r} has {int(counts[c])} {what} rows, fewer "
                f"than the {least} each class needs (at least {MIN_TRAIN_PER_CLASS} training "
                f"and {MIN_TEST_PER_CLASS} test rows per class); add samples or drop that class"
            )
    name = key.lower() if key.lower() in SHIPPED else Path(key).stem
    return Dataset(name, tuple(mods), feats, y, mask, int(classes.size), given,
                   tuple(c.item() for c in classes))
