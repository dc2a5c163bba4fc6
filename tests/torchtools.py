"""Models, batches and the independent reference shared by the torch integration tests.

The reference takes per-example gradients one example at a time (a plain
loop of single-example forward and backward passes), forms the samples of
each sample source from them, feeds ``GradientStats.from_samples`` and
``bogc_core.calibrate``; the calibrator must reproduce ``p.grad``.
"""

from __future__ import annotations

import torch
from torch import nn

from bogc_core import GradientStats, calibrate

SOURCES = ("fusion", "a", "b")


class TwoModal(nn.Module):
    """Two encoders, a fusion head and one head per modality, plus a layer no loss uses."""

    def __init__(self, inplace_relu: bool = False) -> None:
        super().__init__()
        self.enc_a = nn.Linear(5, 6)
        self.enc_b = nn.Linear(4, 6)
        self.fusion = nn.Linear(12, 3)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)
        self.act = nn.ReLU(inplace=True) if inplace_relu else nn.Tanh()

    def forward(self, xa, xb):
        za, zb = self.act(self.enc_a(xa)), self.act(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], dim=1)), self.head_a(za), self.head_b(zb)


def make(seed: int = 0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TwoModal(**kw).to(dtype)


def batch(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, 5, generator=g, dtype=dtype)
    xb = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return xa, xb, y


def losses_of(model, xa, xb, y):
    ce = nn.CrossEntropyLoss(reduction="none")
    f, oa, ob = model(xa, xb)
    return {"fusion": ce(f, y), "a": ce(oa, y), "b": ce(ob, y)}


def loop_grads(model, xa, xb, y):
    """{source: {param name: (B, *shape)}} of per-example gradients, one example at a time."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    out = {s: {} for s in SOURCES}
    for i in range(xa.shape[0]):
        ls = losses_of(model, xa[i:i + 1], xb[i:i + 1], y[i:i + 1])
        for s in SOURCES:
            gs = torch.autograd.grad(ls[s][0], params, allow_unused=True, retain_graph=True)
            for n, g in zip(names, gs):
                if g is not None:
                    out[s].setdefault(n, []).append(g)
    return {s: {n: torch.stack(v) for n, v in d.items()} for s, d in out.items()}


def reference(samples_by_source, config=None, lam=None):
    """{param: expected grad} from {source: {param: samples (n, *shape)}}."""
    per_param: dict[str, dict[str, GradientStats]] = {}
    for s, d in samples_by_source.items():
        for n, x in d.items():
            per_param.setdefault(n, {})[s] = GradientStats.from_samples(x)
    return stats_reference(per_param, config, lam)


def stats_reference(per_param, config=None, lam=None):
    out = {}
    for n, srcs in per_param.items():
        if len(srcs) == 1:
            (s, st), = srcs.items()
            out[n] = st.mean * (1.0 if lam is None else lam[s])
        else:
            w = None if lam is None else {k: lam[k] for k in srcs}
            out[n] = calibrate(srcs, config, w).gradient
    return out


def assert_grads(model, expected, rtol=1e-8, atol=1e-12):
    for n, p in model.named_parameters():
        if n.startswith("unused"):
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], rtol=rtol, atol=atol, msg=n)


def chunk_means(g, chunks):
    return torch.stack([c.mean(dim=0) for c in torch.tensor_split(g, chunks)])


class ConvTwoModal(nn.Module):
    """An image modality through Conv2d layers and a vector modality through Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), dilation=(1, 2), bias=False)
        self.enc_v = nn.Linear(5, 6)
        self.head_i = nn.Linear(4 * 3 * 1, 3)
        self.head_v = nn.Linear(6, 3)
        self.fusion = nn.Linear(12 + 6, 3)

    def forward(self, img, vec):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(img)))).flatten(1)  # (N, 4*3*1)
        z = torch.tanh(self.enc_v(vec))
        return self.fusion(torch.cat([h, z], 1)), self.head_i(h), self.head_v(z)


def source(name: str, layers=None, **opts):
    """The sample source named ``name`` with the options it takes among ``opts``
    (``chunks`` only for micro-batches; ``rho=None`` keeps ``Steps``' default)."""
    from bogc_core.integrations.torch import Laplace, Microbatch, PerExample, Steps

    if name != "microbatch":
        opts.pop("chunks", None)
    if name == "laplace":
        return Laplace(layers, **opts)
    if name == "steps":
        opts.pop("chunk_bytes", None)
        return Steps(**({} if opts.get("rho") is None else {"rho": opts["rho"]}))
    return {"microbatch": Microbatch, "per_example": PerExample}[name](**opts)
