"""The training protocol shared by every method: one run, early stopping, validation tuning.

One run: ``torch.manual_seed(seed)`` fixes the initialisation and the batch
order, identical across methods for a given seed (so differences between
methods are paired). Optimiser: SGD with momentum 0.9, weight decay 1e-4, a
constant learning rate per method; batches of 128, at least 5 steps per epoch
(few-shot training sets are smaller than one batch).

Two results per run, both without looking at the test split:

- ``plateau``: training stops once the validation accuracy has not improved
  for ``patience`` epochs (never before ``fixed_epochs``, never after
  ``max_epochs``); the weights of the best validation epoch (the first one on
  ties) are evaluated.
- ``fixed``: the weights after exactly ``fixed_epochs`` epochs (the fixed
  budget), no selection.

Each is evaluated on the test split with all modalities and with each
modality removed under three rules (:data:`MISSING_RULES`):

- ``zero_fill``: the removed modality's features enter the fusion head as zeros;
- ``mean_impute``: as their mean over the training rows;
- ``surviving_heads``: the prediction is the argmax of the mean of the surviving
  modalities' unimodal-head probabilities (the fusion head is not used). With
  one modality nothing survives: the rule does not apply, its entry is None
  and :data:`NOT_APPLICABLE` says why.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .methods.base import Method
from .metrics import accuracy, macro_f1
from .model import FUSION, MultiModalNet
from .settings import Split

MISSING_RULES = ("zero_fill", "mean_impute", "surviving_heads")
SELECTIONS = ("plateau", "fixed")
#: why a missing-modality rule gives no prediction when a data set has one modality
NOT_APPLICABLE = {"surviving_heads": "the data set has one modality: when it is removed no "
                                     "unimodal head survives to average"}


@dataclass
class TrainConfig:
    """``max_epochs`` / ``patience``: early stopping on validation; ``fixed_epochs``: the fixed budget."""

    max_epochs: int = 40
    patience: int = 5
    fixed_epochs: int = 10
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    hidden: int = 64
    feat: int = 32
    min_steps_per_epoch: int = 5
    curves: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _tensors(xs: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]


@torch.no_grad()
def _fusion_pred(model: MultiModalNet, xs: list[torch.Tensor]) -> np.ndarray:
    return model(xs)[0].argmax(1).numpy()


@torch.no_grad()
def evaluate(model: MultiModalNet, split: Split, xtr: list[torch.Tensor],
             xte: list[torch.Tensor], xva: list[torch.Tensor]) -> dict[str, Any]:
    """Test metrics of the current weights; ``correct`` arrays are per test example (bool)."""
    was = model.training
    model.eval()
    y = split.y_test
    z, zs = model(xte)
    pred = z.argmax(1).numpy()
    probs = [torch.softmax(u, dim=1) for u in zs]
    model(xtr)
    means = [h.mean(dim=0) for h in model.last_features]
    missing: dict[str, dict[str, np.ndarray | None]] = {r: {} for r in MISSING_RULES}
    for i, m in enumerate(split.modalities):
        missing["zero_fill"][m] = model(xte, drop=(i,))[0].argmax(1).numpy() == y
        missing["mean_impute"][m] = model(xte, drop=(i,), fill=means)[0].argmax(1).numpy() == y
        keep = [p for j, p in enumerate(probs) if j != i]
        missing["surviving_heads"][m] = (torch.stack(keep).mean(0).argmax(1).numpy() == y
                                         if keep else None)
    out = {
        "correct": pred == y,
        "accuracy": accuracy(y, pred),
        "macro_f1": macro_f1(y, pred, split.n_classes),
        "val_accuracy": accuracy(split.y_val, _fusion_pred(model, xva)),
        "unimodal_accuracy": {m: accuracy(y, p.argmax(1).numpy())
                              for m, p in zip(split.modalities, probs)},
        "missing_correct": missing,
    }
    model.train(was)
    return out


def train_run(split: Split, method: Method, seed: int, cfg: TrainConfig,
              on_step: Callable[[], None] | None = None, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one model with ``method``; return both results (see the module docstring).

    ``evaluate_test=False`` (tuning) skips every test-split computation.
    """
    torch.manual_seed(seed)
    dims = {m: x.shape[1] for m, x in zip(split.modalities, split.train)}
    model = MultiModalNet(dims, split.n_classes, cfg.hidden, cfg.feat)
    xtr, ytr = _tensors(split.train), torch.from_numpy(split.y_train)
    xva, xte = _tensors(split.val), _tensors(split.test)
    n = ytr.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(math.ceil(n / bs), cfg.min_steps_per_epoch)
    method.steps_per_epoch = steps
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=method.lr or 0.03, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    val_curve: list[float] = []
    diag_curve: list[dict[str, float]] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    best_val, best_epoch, best_state = -1.0, -1, None
    fixed: dict[str, Any] | None = None
    fixed_val = math.nan
    seconds = 0.0
    for epoch in range(cfg.max_epochs):
        t0 = time.perf_counter()
        method.start_epoch(epoch, cfg.max_epochs)
        acc_diag: dict[str, list[float]] = {}
        for _ in range(steps):
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + bs]
            pos += bs
            y = ytr[idx]
            z, zs = model([x[idx] for x in xtr])
            losses = {FUSION: F.cross_entropy(z, y, reduction="none")}
            for m, zm in zip(model.modalities, zs):
                losses[m] = F.cross_entropy(zm, y, reduction="none")
            opt.zero_grad(set_to_none=True)
            d = method.backward(losses, (z, zs), y)
            opt.step()
            for k, v in (d or {}).items():
                acc_diag.setdefault(k, []).append(float(v))
            if on_step is not None:
                on_step()
        seconds += time.perf_counter() - t0
        diag_curve.append({k: float(np.mean(v)) for k, v in acc_diag.items()})
        model.eval()
        va = accuracy(split.y_val, _fusion_pred(model, xva))
        if cfg.curves and evaluate_test:
            curve.append(accuracy(split.y_test, _fusion_pred(model, xte)))
        model.train()
        val_curve.append(va)
        if va > best_val:
            best_val, best_epoch = va, epoch
            best_state = copy.deepcopy(model.state_dict())
        if epoch + 1 == cfg.fixed_epochs:
            fixed_val = va
            if evaluate_test:
                fixed = evaluate(model, split, xtr, xte, xva)
        if epoch + 1 >= cfg.fixed_epochs and epoch - best_epoch >= cfg.patience:
            break
    epochs_run = len(val_curve)
    if epochs_run < cfg.fixed_epochs:  # max_epochs < fixed_epochs: the budget is what ran
        fixed_val = val_curve[-1]
        if evaluate_test:
            fixed = evaluate(model, split, xtr, xte, xva)
    out: dict[str, Any] = {
        "seed": seed,
        "val_accuracy": {"plateau": best_val, "fixed": fixed_val},
        "best_epoch": best_epoch + 1,
        "epochs_run": epochs_run,
        "val_curve": val_curve,
        "test_curve": curve,
        "diagnostics": diag_curve,
        "seconds": seconds,
    }
    if evaluate_test:
        assert best_state is not None
        model.load_state_dict(best_state)
        out["results"] = {"plateau": evaluate(model, split, xtr, xte, xva), "fixed": fixed}
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def choose(record: list[dict[str, Any]], selection: str) -> dict[str, Any]:
    """The grid point with the highest mean validation accuracy under ``selection``.

    Tie rule: on equal means the earlier point of the grid wins (the grid is in
    increasing learning rate, so the smaller learning rate).
    """
    best, best_acc = None, -1.0
    for r in record:
        if r["val_accuracy"][selection] > best_acc:
            best, best_acc = r["params"], r["val_accuracy"][selection]
    assert best is not None
    return best


def tune(split: Split, method: Method, cfg: TrainConfig, grid: dict[str, list[Any]],
         seeds: list[int], on_point: Callable[[], None] | None = None) -> dict[str, Any]:
    """Validation-only grid search; the record of every point and seed, and the choices."""
    quiet = TrainConfig(**{**cfg.as_dict(), "curves": False})
    record = []
    for point in grid_points(grid):
        cand = method.with_params(**point)
        runs = [train_run(split, cand, s, quiet, evaluate_test=False) for s in seeds]
        record.append({
            "params": point,
            "val_accuracy": {sel: float(np.mean([r["val_accuracy"][sel] for r in runs]))
                             for sel in SELECTIONS},
            "val_accuracies": {sel: [float(r["val_accuracy"][sel]) for r in runs]
                               for sel in SELECTIONS},
            "epochs_run": [r["epochs_run"] for r in runs],
            "seconds": float(sum(r["seconds"] for r in runs)),
        })
        if on_point is not None:
            on_point()
    return {"grid": record, "tune_seeds": seeds,
            "chosen": {sel: choose(record, sel) for sel in SELECTIONS}}
