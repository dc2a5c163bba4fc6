"""Benchmark settings: how the training/validation/test arrays are formed from a data set.

- ``standard``: train on the training split minus a validation carve-out.
- ``missing``: the standard model, evaluated with each modality removed at test
  time under each rule of :data:`.protocol.MISSING_RULES`, one result per modality.
- ``fewshot``: ``k`` labelled training examples per class (drawn per seed).
- ``noisy``: one modality's standardised features (train, validation and test)
  corrupted by fixed Gaussian noise of standard deviation ``noise_std``.
- ``zeroshot``: train and validate on the seen classes, test on every row of the
  unseen ones (a fixed class split, :func:`.zeroshot.class_split`); training
  labels are renumbered ``0..n_seen-1``, test labels keep their class ids.

The validation split (stratified 20 % of the training split, fixed seed) is
only used to choose hyper-parameters; the test split is never used for that.
Features are standardised per modality and feature with the statistics of the
rows the model is trained on (in few-shot, the few-shot rows only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bogc_core.errors import ConfigError

from ..data import Dataset

SETTINGS = ("standard", "missing", "fewshot", "noisy", "zeroshot")
#: modality corrupted in the ``noisy`` setting (the strongest one, by its own head under
#: ``sum``): the shipped data sets, and Scene-15 and PIE converted by ``bogc data convert``
NOISE_MODALITY = {"av-mnist": "image", "av-digits": "audio", "mfeat": "fac", "scene15": "phog",
                  "pie": "gabor"}


@dataclass
class Split:
    """Float32 arrays per modality for train/val/test, labels, and the setting's metadata."""

    modalities: tuple[str, ...]
    train: list[np.ndarray]
    y_train: np.ndarray
    val: list[np.ndarray]
    y_val: np.ndarray
    test: list[np.ndarray]
    y_test: np.ndarray
    n_classes: int
    info: dict


def _val_carve(y: np.ndarray, frac: float = 0.2, seed: int = 12345) -> np.ndarray:
    rng = np.random.default_rng(seed)
    val = np.zeros(y.size, dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val[idx[: max(1, int(round(frac * idx.size)))]] = True
    return val


def make_split(data: Dataset, setting: str = "standard", seed: int = 0, shots: int = 5,
               noise_std: float = 1.0, noise_modality: str | None = None,
               max_train: int | None = None) -> Split:
    """Build the arrays of one run. ``seed`` draws the few-shot subset (and nothing else).

    ``max_train`` keeps only the first (stratified-shuffled) rows of training, for smoke runs.
    """
    if setting not in SETTINGS:
        raise ConfigError(f"setting: must be one of {SETTINGS}, got {setting!r}")
    tr_all = np.flatnonzero(~data.test_mask)
    te = np.flatnonzero(data.test_mask)
    info: dict = {"setting": setting}
    y_fit, n_classes = data.y, data.n_classes
    if setting == "zeroshot":
        tr_all, te, y_fit, n_classes = _zeroshot_rows(data, tr_all, info)
    vmask = _val_carve(data.y[tr_all])
    tr, va = tr_all[~vmask], tr_all[vmask]
    if max_train is not None and tr.size > max_train:
        tr = np.random.default_rng(0).permutation(tr)[:max_train]
    if setting == "fewshot":
        if shots < 1:
            raise ConfigError(f"shots: must be >= 1, got {shots}")
        rng = np.random.default_rng(1000 + seed)
        pick = []
        for c in range(data.n_classes):
            idx = tr[data.y[tr] == c]
            pick.append(rng.choice(idx, size=min(shots, idx.size), replace=False))
        tr = np.sort(np.concatenate(pick))
        info["shots"] = shots
    mods = data.modalities
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for m in mods:
        x = data.x[m]
        mu = x[tr].mean(axis=0)
        sd = x[tr].std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        z = ((x - mu) / sd).astype(np.float32)
        for k, rows in (("train", tr), ("val", va), ("test", te)):
            out[k].append(z[rows])
    if setting == "noisy":
        nm = noise_modality or NOISE_MODALITY.get(data.name, mods[0])
        if nm not in mods:
            raise ConfigError(f"noise_modality: {nm!r} is not one of the modalities {mods}")
        i = mods.index(nm)
        rng = np.random.default_rng(777)  # fixed corruption: part of the data, same for every seed
        for k in out:
            out[k][i] = out[k][i] + rng.normal(0.0, noise_std, out[k][i].shape).astype(np.float32)
        info.update(noise_modality=nm, noise_std=noise_std)
    return Split(mods, out["train"], y_fit[tr], out["val"], y_fit[va], out["test"], data.y[te],
                 n_classes, info)


def _zeroshot_rows(data: Dataset, tr_all: np.ndarray,
                   info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Seen-class training rows, every unseen-class row, labels renumbered over the seen classes."""
    from .zeroshot import class_split

    if len(data.modalities) < 2:
        raise ConfigError(f"setting: zeroshot retrieves across modalities and needs at least 2; "
                          f"{data.name!r} has {list(data.modalities)}; add a modality or choose "
                          f"another --setting")
    seen, unseen = class_split(data.n_classes)
    info.update(seen_classes=seen, unseen_classes=unseen,
                unseen_class_labels=[_label(data.classes[c]) for c in unseen] if data.classes else [])
    y_fit = np.full(data.y.shape, -1, dtype=data.y.dtype)
    y_fit[np.isin(data.y, seen)] = np.searchsorted(seen, data.y[np.isin(data.y, seen)])
    return (tr_all[np.isin(data.y[tr_all], seen)], np.flatnonzero(np.isin(data.y, unseen)), y_fit,
            len(seen))


def _label(c) -> int | float | str:
    """A class label as a JSON value."""
    v = c.item() if isinstance(c, np.generic) else c
    return v if isinstance(v, int | float | str) else str(v)
