"""Two-view logistic regression trained with BOGC in plain NumPy.

No deep-learning framework: the per-example gradients of a logistic model
are written out by hand, summarised with ``GradientStats.from_samples`` and
calibrated with ``calibrate_tensors``. Run it with::

    python examples/numpy_logreg.py

The model has one weight vector per view and a shared bias; the prediction
uses the fused logit ``z = xa @ wa + xb @ wb + b``. Three losses (sources)
send gradients to the parameters:

- ``fusion``: binary cross-entropy of the fused logit (reaches wa, wb, b);
- ``view_a``: cross-entropy of ``xa @ wa + b`` alone (reaches wa, b);
- ``view_b``: cross-entropy of ``xb @ wb + b`` alone (reaches wb, b).

For binary cross-entropy with logit ``z`` the per-example gradient is
``(sigmoid(z) - y) * dz/dtheta``, so every source's per-example gradients of
every parameter come out in closed form. Only the sources that reach a
parameter take part in its calibration (docs/method.md#calibrated-update).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from bogc_core import CalibrationConfig, GradientStats, calibrate_tensors

Params = dict[str, np.ndarray]

# Which sources reach which parameter.
REACH = {
    "wa": ("fusion", "view_a"),
    "wb": ("fusion", "view_b"),
    "b": ("fusion", "view_a", "view_b"),
}


@dataclass
class Data:
    xa: np.ndarray  # (n, da) view a
    xb: np.ndarray  # (n, db) view b
    y: np.ndarray  # (n,) labels in {0, 1}

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Data:
        return Data(self.xa[idx], self.xb[idx], self.y[idx])


def make_data(n: int = 3000, da: int = 8, db: int = 8, seed: int = 0) -> tuple[Data, Data]:
    """A train/test split where view a is informative and view b weak and noisy."""
    rng = np.random.default_rng(seed)
    wa, wb = rng.normal(size=da), rng.normal(size=db)
    xa = rng.normal(size=(n, da))
    xb = rng.normal(size=(n, db)) * 3.0
    logit = xa @ wa + 0.15 * (xb @ wb) + 0.5 * rng.normal(size=n)
    y = (logit > 0).astype(np.float64)
    data = Data(xa, xb, y)
    cut = int(0.7 * n)
    return data.take(np.arange(cut)), data.take(np.arange(cut, n))


def init_params(da: int, db: int) -> Params:
    return {"wa": np.zeros(da), "wb": np.zeros(db), "b": np.zeros(())}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def logits(params: Params, d: Data) -> dict[str, np.ndarray]:
    za, zb = d.xa @ params["wa"], d.xb @ params["wb"]
    return {"fusion": za + zb + params["b"], "view_a": za + params["b"], "view_b": zb + params["b"]}


def losses(params: Params, d: Data) -> dict[str, float]:
    """Mean binary cross-entropy of each source, ``log(1 + e^z) - y z``."""
    return {k: float(np.mean(np.logaddexp(0.0, z) - d.y * z)) for k, z in logits(params, d).items()}


def per_example_grads(params: Params, d: Data) -> dict[str, dict[str, np.ndarray]]:
    """``grads[param][source]``: per-example gradients, shape ``(batch, *param.shape)``."""
    r = {k: _sigmoid(z) - d.y for k, z in logits(params, d).items()}  # dL/dz per example
    inputs = {"wa": d.xa, "wb": d.xb}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, sources in REACH.items():
        if name == "b":
            out[name] = {k: r[k] for k in sources}
        else:
            out[name] = {k: r[k][:, None] * inputs[name] for k in sources}
    return out


def accuracy(params: Params, d: Data) -> float:
    return float(np.mean((logits(params, d)["fusion"] > 0) == (d.y > 0.5)))


def train(
    data: Data,
    method: str = "bogc",
    config: CalibrationConfig | None = None,
    epochs: int = 15,
    batch: int = 64,
    lr: float = 0.3,
    seed: int = 0,
) -> tuple[Params, list[float]]:
    """Mini-batch SGD; ``method`` is ``"bogc"`` (calibrated update) or ``"sum"`` (plain sum).

    Returns the parameters and the fused training loss after each epoch.
    """
    if method not in ("bogc", "sum"):
        raise ValueError(f"method: expected 'bogc' or 'sum', got {method!r}")
    rng = np.random.default_rng(seed)
    params = init_params(data.xa.shape[1], data.xb.shape[1])
    names = list(REACH)
    history = []
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for start in range(0, len(data) - batch + 1, batch):
            grads = per_example_grads(params, data.take(order[start : start + batch]))
            if method == "sum":
                update = [sum(g.mean(axis=0) for g in grads[n].values()) for n in names]
            else:
                stats = [
                    {k: GradientStats.from_samples(g) for k, g in grads[n].items()} for n in names
                ]
                update = [cal.gradient for cal in calibrate_tensors(stats, config)]
            params = {n: params[n] - lr * u for n, u in zip(names, update, strict=True)}
        history.append(losses(params, data)["fusion"])
    return params, history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_set, test_set = make_data(seed=args.seed)
    print(f"{'method':<6} {'train loss':>10} {'test acc':>9}")
    for method in ("sum", "bogc"):
        params, history = train(train_set, method, epochs=args.epochs, seed=args.seed)
        print(f"{method:<6} {history[-1]:>10.4f} {accuracy(params, test_set):>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
