"""Train a two-modality classifier with BOGC-calibrated gradients (CPU, synthetic data, seconds).

Three losses share the encoders: the fusion head's and one head per modality.
``GradientCalibrator.backward`` replaces ``sum(loss.mean()).backward()``.
Run: ``python examples/train_two_modality.py --samples microbatch --epochs 5``
"""

import argparse

import torch
from bogc_core.integrations.torch import GradientCalibrator
from torch import nn


def make_data(n, gen):
    y = torch.randint(0, 4, (n,), generator=gen)
    centers_a, centers_b = torch.randn(4, 16, generator=gen), torch.randn(4, 8, generator=gen)
    xa = centers_a[y] + 0.8 * torch.randn(n, 16, generator=gen)  # informative modality
    xb = centers_b[y] + 2.5 * torch.randn(n, 8, generator=gen)  # noisy modality
    return xa, xb, y


class TwoModalNet(nn.Module):
    def __init__(self, hidden=32, classes=4):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(16, hidden), nn.ReLU())
        self.enc_b = nn.Sequential(nn.Linear(8, hidden), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(hidden, classes), nn.Linear(hidden, classes)
        self.fusion = nn.Linear(2 * hidden, classes)

    def forward(self, xa, xb):
        za, zb = self.enc_a(xa), self.enc_b(xb)
        return self.fusion(torch.cat([za, zb], 1)), self.head_a(za), self.head_b(zb)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="microbatch", choices=["microbatch", "per_example", "steps", "laplace"])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    xa, xb, y = make_data(2048, gen)
    torch.manual_seed(0)
    model = TwoModalNet()
    extra = {"laplace_layers": {"fusion": model.fusion, "a": model.head_a, "b": model.head_b}} if args.samples == "laplace" else {}
    # diagnostics_every=1: the per-source weights are summarised on every step (the default, 50,
    # samples one step in 50 and saves that summary's cost)
    cal = GradientCalibrator(model.named_parameters(), samples=args.samples, model=model,
                             diagnostics_every=1, **extra)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce = nn.CrossEntropyLoss(reduction="none")  # per-example losses
    for epoch in range(args.epochs):
        weights: dict = {}  # source -> its mean weight on each calibrated step of the epoch
        for idx in torch.randperm(1536, generator=gen).split(64):  # first 1536 examples train
            fused, out_a, out_b = model(xa[idx], xb[idx])
            opt.zero_grad(set_to_none=True)
            diag = cal.backward({"fusion": ce(fused, y[idx]), "a": ce(out_a, y[idx]), "b": ce(out_b, y[idx])})
            for source, w in diag.get("weight_mean", {}).items():  # absent on a warm-up step
                weights.setdefault(source, []).append(w)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        with torch.no_grad():
            acc = (model(xa[1536:], xb[1536:])[0].argmax(1) == y[1536:]).float().mean().item()
        steps = max((len(v) for v in weights.values()), default=0)
        w = {k: round(sum(v) / len(v), 3) for k, v in weights.items()}
        print(f"epoch {epoch}: test accuracy {acc:.3f}  mean source weights over the epoch's "
              f"{steps} calibrated steps {w}")
    return acc


if __name__ == "__main__":
    main()
