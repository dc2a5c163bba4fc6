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

Validation tuning: :func:`tune_lr` chooses a method's learning rate (an
edge-extended grid, then successive halving over the tuning seeds, the same
number of trained configurations for every method); :func:`tune` evaluates a
given grid on every seed (the pre-registered search).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bogc_core.errors import NonFiniteError

from .methods.base import Method
from .metrics import accuracy, macro_f1
from .model import ALIGN, FUSION, MultiModalNet
from .models import build_model
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
    #: ``"mlp"`` (:class:`.model.MultiModalNet`) or ``"transformer"`` (:mod:`.transformer`)
    model: str = "mlp"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _tensors(xs: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]


@torch.no_grad()
def _fusion_pred(model: MultiModalNet, xs: list[torch.Tensor]) -> np.ndarray:
    return model(xs)[0].argmax(1).numpy()


def _model_score(model: MultiModalNet, split: Split, xs: list[torch.Tensor], y: np.ndarray) -> float:
    """Fusion accuracy; in ``zeroshot`` the retrieval class accuracy (:mod:`.zeroshot`)."""
    if ALIGN in model.sources:
        from .zeroshot import retrieval_accuracy

        return retrieval_accuracy(model, xs, y)
    return accuracy(y, _fusion_pred(model, xs))


@torch.no_grad()
def evaluate(model: MultiModalNet, split: Split, xtr: list[torch.Tensor],
             xte: list[torch.Tensor], xva: list[torch.Tensor]) -> dict[str, Any]:
    """Test metrics of the current weights; ``correct`` arrays are per test example (bool)."""
    if ALIGN in model.sources:
        from . import zeroshot

        return zeroshot.evaluate(model, split, xte, xva)
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
        z0, zs0 = model(xte, drop=(i,))
        missing["zero_fill"][m] = z0.argmax(1).numpy() == y
        missing["mean_impute"][m] = model(xte, drop=(i,), fill=means)[0].argmax(1).numpy() == y
        # the heads of the forward without modality i (the transformer's attend to the rest only);
        # with one modality nothing survives and the rule does not apply
        keep = [torch.softmax(u, dim=1) for j, u in enumerate(zs0) if j != i]
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


def source_losses(model: Any, z: torch.Tensor, zs: list[torch.Tensor],
                  y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example losses ``(B,)`` of every source of the forward ``(z, zs)``: ``fusion``, each
    modality's head, and (``zeroshot``) the batch's ``align`` loss."""
    losses = {FUSION: F.cross_entropy(z, y, reduction="none")}
    for m, zm in zip(model.modalities, zs):
        losses[m] = F.cross_entropy(zm, y, reduction="none")
    if ALIGN in model.sources:
        from .zeroshot import info_nce

        losses[ALIGN] = info_nce(model.last_embeddings)
    return losses


def train_run(split: Split, method: Method, seed: int, cfg: TrainConfig,
              on_step: Callable[[], None] | None = None, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one model with ``method``; return both results (see the module docstring).

    ``evaluate_test=False`` (tuning) skips every test-split computation. A run whose loss
    or gradient turns non-finite stops at once, after validating that epoch's weights;
    ``diverged`` holds that epoch (1-based), 0 for a run that did not diverge.
    """
    torch.manual_seed(seed)
    dims = {m: x.shape[1] for m, x in zip(split.modalities, split.train)}
    model = build_model(cfg.model, dims, split.n_classes, cfg.hidden, cfg.feat,
                        align=split.info.get("setting") == "zeroshot")
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
    diverged = 0  # the 1-based epoch in which a loss or gradient turned non-finite, 0 if none
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
            losses = source_losses(model, z, zs, y)
            opt.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(v).all()) for v in losses.values()):
                diverged = epoch + 1
                break
            try:
                d = method.backward(losses, (z, zs), y)
            except NonFiniteError:  # BOGC refuses a non-finite gradient: the step size is too large
                diverged = epoch + 1
                break
            opt.step()
            for k, v in (d or {}).items():
                acc_diag.setdefault(k, []).append(float(v))
            if on_step is not None:
                on_step()
        seconds += time.perf_counter() - t0
        diag_curve.append({k: float(np.mean(v)) for k, v in acc_diag.items()})
        model.eval()
        va = _model_score(model, split, xva, split.y_val)
        if cfg.curves and evaluate_test:
            curve.append(_model_score(model, split, xte, split.y_test))
        model.train()
        val_curve.append(va)
        if va > best_val:
            best_val, best_epoch = va, epoch
            best_state = copy.deepcopy(model.state_dict())
        if epoch + 1 == cfg.fixed_epochs:
            fixed_val = va
            if evaluate_test:
                fixed = evaluate(model, split, xtr, xte, xva)
        if diverged or (epoch + 1 >= cfg.fixed_epochs and epoch - best_epoch >= cfg.patience):
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
        "diverged": diverged,
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
    """Every point of ``grid`` on every seed, validation only; the record of every point and
    seed, and the choices (:func:`choose`)."""
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


def _score(run: dict[str, Any], sel: str) -> float:
    """A tuning run's validation accuracy under ``sel``; 0 for a diverged run."""
    return 0.0 if run["diverged"] else float(run["val_accuracy"][sel])


def tune_lr(split: Split, method: Method, cfg: TrainConfig, seeds: Sequence[int],
            ladder: Callable[[int], float], base: tuple[int, int], extensions: int,
            on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Choose ``method``'s learning rate on validation: an edge-extended grid, then successive
    halving over the tuning seeds. Every method trains :func:`tuning_budget` configurations.

    1. Rung 0: every base point ``ladder(k)``, ``base[0] <= k <= base[1]``, on ``seeds[0]``.
    2. ``extensions`` more points on ``seeds[0]``, one at a time, each one ladder step
       beyond the tried grid: beyond the edge where a selection's best point sits
       (``plateau`` first on even-numbered extensions, ``fixed`` first on odd ones), else beyond the edge nearer the ``plateau``
       best point (at equal distance, on the side of its better neighbour; ties: the
       smaller learning rate).
    3. Rung ``r = 1 .. len(seeds) - 1``: keep ``ceil(n / 2)`` of the ``n`` points alive,
       taking in turn the next best by ``plateau`` and by ``fixed`` (mean over
       ``seeds[:r]``), and train them on ``seeds[r]``.
    4. Each selection's choice: the point of the last rung with the highest mean over its
       seeds (:func:`choose`). ``interior[sel]``: a tried point lies on each side of it.

    ``extensions`` records each added point: ``cause`` ``"edge"`` (with the ``selection``
    whose best point sat at the edge) or ``"spare"``.

    A diverged run (see :func:`train_run`) scores validation accuracy 0.
    """
    quiet = TrainConfig(**{**cfg.as_dict(), "curves": False})
    runs: dict[int, list[dict[str, Any]]] = {}

    def train(k: int, seed: int) -> None:
        cand = method.with_params(lr=ladder(k))
        runs.setdefault(k, []).append(train_run(split, cand, seed, quiet, evaluate_test=False))
        if on_run is not None:
            on_run()

    def mean(k: int, sel: str) -> float:
        return float(np.mean([_score(r, sel) for r in runs[k]]))

    def best(points: list[int], sel: str) -> int:
        return max(sorted(points), key=lambda k: (mean(k, sel), -k))

    tried = list(range(base[0], base[1] + 1))
    for k in tried:
        train(k, seeds[0])
    added = []
    for i in range(extensions):
        lo, hi = tried[0], tried[-1]
        step: tuple[int, str, str | None, str] | None = None
        for sel in SELECTIONS[i % 2:] + SELECTIONS[: i % 2]:  # the first pick alternates
            b = best(tried, sel)
            if b in (lo, hi):
                step = (lo - 1 if b == lo else hi + 1, "edge", sel,
                        f"{sel}'s best point {ladder(b):g} is the edge of the grid tried")
                break
        if step is None:  # every best point is interior
            b = best(tried, "plateau")
            down = (b - lo, mean(b + 1, "plateau")) <= (hi - b, mean(b - 1, "plateau"))
            step = (lo - 1 if down else hi + 1, "spare", None,
                    "every best point is interior: beyond the edge nearer the plateau best")
        train(step[0], seeds[0])
        tried = sorted([*tried, step[0]])
        added.append({"lr": ladder(step[0]), "direction": "down" if step[0] < lo else "up",
                      "cause": step[1], "selection": step[2], "reason": step[3]})
    alive = list(tried)
    rungs = [{"seeds": [seeds[0]], "lr": [ladder(k) for k in alive]}]
    def ranked(points: list[int], sel: str) -> list[int]:
        return sorted(points, key=lambda k: (-mean(k, sel), k))

    for r in range(1, len(seeds)):
        keep: list[int] = []
        for pair in zip(*(ranked(alive, sel) for sel in SELECTIONS)):
            for k in pair:
                if k not in keep and len(keep) < math.ceil(len(alive) / 2):
                    keep.append(k)
        alive = sorted(keep)
        for k in alive:
            train(k, seeds[r])
        rungs.append({"seeds": list(seeds[: r + 1]), "lr": [ladder(k) for k in alive]})
    record = [{
        "params": {"lr": ladder(k)},
        "seeds": list(seeds[: len(runs[k])]),
        "rung": len(runs[k]) - 1,
        "val_accuracy": {sel: mean(k, sel) for sel in SELECTIONS},
        "val_accuracies": {sel: [_score(r, sel) for r in runs[k]] for sel in SELECTIONS},
        "diverged": [r["diverged"] for r in runs[k]],
        "epochs_run": [r["epochs_run"] for r in runs[k]],
        "seconds": float(sum(r["seconds"] for r in runs[k])),
    } for k in tried]
    last = [g for g in record if g["rung"] == len(rungs) - 1]
    chosen = {sel: choose(last, sel) for sel in SELECTIONS}
    lrs = [ladder(k) for k in tried]
    return {
        "scheme": "edge-extended grid, successive halving over the tuning seeds",
        "base_grid": [ladder(k) for k in range(base[0], base[1] + 1)],
        "extensions": added,
        "tried": lrs,
        "rungs": rungs,
        "configurations": sum(len(v) for v in runs.values()),
        "grid": record,
        "tune_seeds": list(seeds),
        "chosen": chosen,
        "interior": {sel: lrs[0] < chosen[sel]["lr"] < lrs[-1] for sel in SELECTIONS},
    }


def tuning_budget(n_base: int, extensions: int, n_seeds: int) -> int:
    """Trained configurations (learning rate, seed) of :func:`tune_lr`, the same for every method."""
    n, total = n_base + extensions, n_base + extensions
    for _ in range(1, n_seeds):
        n = math.ceil(n / 2)
        total += n
    return total
