"""Training loop shared by every method, and the multi-seed / tuning drivers.

One run: ``torch.manual_seed(seed)`` fixes the initialisation and the batch
order, identical across methods for a given seed (so differences between
methods are paired). Optimiser: SGD with momentum 0.9, weight decay 1e-4, a
constant learning rate per method (chosen on the validation split, see
:data:`.registry.GRIDS`); batches of 128, at least 5 steps per epoch (few-shot training sets are smaller
than one batch). The reported numbers are the fusion head's predictions after
the last epoch; no checkpoint is selected on the test split.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Method
from .metrics import accuracy, macro_f1
from .model import FUSION, MultiModalNet
from .settings import Split


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    hidden: int = 64
    feat: int = 32
    min_steps_per_epoch: int = 5
    curves: bool = True


def _tensors(xs: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]


@torch.no_grad()
def predict(model: MultiModalNet, xs: list[torch.Tensor], drop=()) -> tuple[np.ndarray, list[np.ndarray]]:
    model.eval()
    z, zs = model(xs, drop=drop)
    model.train()
    return z.argmax(1).numpy(), [u.argmax(1).numpy() for u in zs]


def train_run(split: Split, method: Method, seed: int, cfg: TrainConfig,
              on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one model with ``method``; return metrics, curves and diagnostics."""
    torch.manual_seed(seed)
    dims = {m: x.shape[1] for m, x in zip(split.modalities, split.train)}
    model = MultiModalNet(dims, split.n_classes, cfg.hidden, cfg.feat)
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=method.lr or cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    xtr, ytr = _tensors(split.train), torch.from_numpy(split.y_train)
    xva, xte = _tensors(split.val), _tensors(split.test)
    n = ytr.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(math.ceil(n / bs), cfg.min_steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    curve, val_curve, diag_curve = [], [], []
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(cfg.epochs):
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
        if cfg.curves:
            curve.append(accuracy(split.y_test, predict(model, xte)[0]))
            val_curve.append(accuracy(split.y_val, predict(model, xva)[0]))
        diag_curve.append({k: float(np.mean(v)) for k, v in acc_diag.items()})
    pred, uni = predict(model, xte)
    vpred, _ = predict(model, xva)
    out: dict[str, Any] = {
        "seed": seed,
        "accuracy": accuracy(split.y_test, pred),
        "macro_f1": macro_f1(split.y_test, pred, split.n_classes),
        "val_accuracy": accuracy(split.y_val, vpred),
        "unimodal_accuracy": {m: accuracy(split.y_test, p) for m, p in zip(split.modalities, uni)},
        "missing_accuracy": {
            m: accuracy(split.y_test, predict(model, xte, drop=(i,))[0])
            for i, m in enumerate(split.modalities)
        },
        "missing_macro_f1": {
            m: macro_f1(split.y_test, predict(model, xte, drop=(i,))[0], split.n_classes)
            for i, m in enumerate(split.modalities)
        },
        "test_curve": curve,
        "val_curve": val_curve,
        "diagnostics": diag_curve,
        "seconds": time.perf_counter() - t0,
    }
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def tune(split: Split, method: Method, cfg: TrainConfig, seeds: list[int],
         on_step: Callable[[], None] | None = None) -> tuple[Method, dict[str, Any]]:
    """Pick the grid point of ``method.grid`` with the best mean *validation* accuracy.

    Returns the configured method and a record of every point's validation accuracy.
    """
    if not method.grid:
        return method, {}
    quiet = TrainConfig(**{**cfg.__dict__, "curves": False})
    record = []
    best, best_acc = None, -1.0
    for point in grid_points(method.grid):
        cand = method.with_params(**point)
        accs = [train_run(split, cand, s, quiet, on_step)["val_accuracy"] for s in seeds]
        va = float(np.mean(accs))
        record.append({"params": point, "val_accuracy": va})
        if va > best_acc:
            best, best_acc = point, va
    return method.with_params(**best), {"chosen": best, "grid": record, "tune_seeds": seeds}
