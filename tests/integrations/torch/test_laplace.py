"""samples="laplace": moments of the linearised Laplace draws against an exact computation.

The reference builds, independently of the calibrator, the Fisher diagonal
from a loop over single examples and the exact mixed second derivative
``d^2 L / d theta d W`` with ``torch.func``; the draws' variance must converge
to ``sum_j (d^2 L / d theta_d d W_j)^2 / (F_j + prior_precision)``.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, Laplace  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev  # noqa: E402

from bogc_core import calibrate  # noqa: E402
from bogc_core.errors import ConfigError  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 5)
        self.head_u = nn.Linear(5, 3)
        self.head_v = nn.Linear(5, 2)

    def forward(self, x):
        z = torch.tanh(self.enc(x))
        return self.head_u(z), self.head_v(z)


def setup(n=10, seed=0):
    torch.manual_seed(seed)
    m = Net().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    yu = torch.randint(0, 3, (n,), generator=g)
    yv = torch.randint(0, 2, (n,), generator=g)
    return m, x, yu, yv


def losses(m, x, yu, yv):
    ce = nn.CrossEntropyLoss(reduction="none")
    u, v = m(x)
    return {"u": ce(u, yu), "v": ce(v, yv)}


def exact_variance(m, x, yu, yv, source, head, prior):
    """Delta-method variance of the source's gradient on enc.weight under the head's Laplace posterior."""
    params = {k: v.detach() for k, v in m.named_parameters()}
    wname = f"{head}.weight"

    def mean_loss(enc_w, head_w):
        p = dict(params, **{"enc.weight": enc_w, wname: head_w})
        return losses(lambda inp: functional_call(m, p, (inp,)), x, yu, yv)[source].mean()

    grad_enc = jacrev(mean_loss, argnums=0)
    H = jacrev(grad_enc, argnums=1)(params["enc.weight"], params[wname])  # (5,4, out,5)
    # Fisher diagonal of the head weight, one example at a time.
    F = torch.zeros_like(params[wname])
    for i in range(x.shape[0]):
        li = losses(m, x[i:i + 1], yu[i:i + 1], yv[i:i + 1])[source][0]
        g = torch.autograd.grad(li, getattr(m, head).weight)[0]
        F += g * g
    # Only the head's weight is perturbed in this comparison: the bias part is added below.
    var_w = (H * H / (F + prior)).sum(dim=(-2, -1))

    def grad_enc_b(enc_w, head_b):
        p = dict(params, **{"enc.weight": enc_w, f"{head}.bias": head_b})
        return losses(lambda inp: functional_call(m, p, (inp,)), x, yu, yv)[source].mean()

    Hb = jacrev(jacrev(grad_enc_b, argnums=0), argnums=1)(params["enc.weight"], params[f"{head}.bias"])
    Fb = torch.zeros_like(params[f"{head}.bias"])
    for i in range(x.shape[0]):
        li = losses(m, x[i:i + 1], yu[i:i + 1], yv[i:i + 1])[source][0]
        g = torch.autograd.grad(li, getattr(m, head).bias)[0]
        Fb += g * g
    return var_w + (Hb * Hb / (Fb + prior)).sum(dim=-1)


def test_laplace_moments_match_exact_linearised_posterior():
    m, x, yu, yv = setup()
    prior, T = 2.0, 4000
    cal = GradientCalibrator(m.named_parameters(), samples=Laplace(layers={"u": m.head_u, "v": m.head_v}, draws=T, prior_precision=prior), diagnostics=Diagnostics(keep_statistics=True))
    diag = cal.backward(losses(m, x, yu, yv))
    ls = losses(m, x, yu, yv)
    for src, head in (("u", "head_u"), ("v", "head_v")):
        st = cal.last_statistics[src]["enc.weight"]
        g = torch.autograd.grad(ls[src].mean(), m.enc.weight, retain_graph=True)[0]
        torch.testing.assert_close(st.mean, g)  # moment matching keeps the exact mean
        assert float(st.count) == T
        var = exact_variance(m, x, yu, yv, src, head, prior)
        est = st.m2 / T
        # T/2 independent antithetic pairs: relative sd of the estimate 2/sqrt(T).
        assert bool(((est - var).abs() <= 6 * 2 / T ** 0.5 * var + 1e-14).all()), (est / var)
    ref = calibrate({s: cal.last_statistics[s]["enc.weight"] for s in ("u", "v")}).gradient
    torch.testing.assert_close(m.enc.weight.grad, ref)
    assert diag["parameters"]["head_u.weight"]["single_source"] == "u"


def test_laplace_resume_is_bit_identical():
    def run(split):
        m, x, yu, yv = setup()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        def mk():
            return GradientCalibrator(m.named_parameters(), samples=Laplace(
                layers={"u": m.head_u, "v": m.head_v}, draws=6, seed=3))
        cal, out = mk(), []
        for step in range(4):
            if step == split:
                buf = io.BytesIO()
                torch.save(cal.state_dict(), buf)
                buf.seek(0)
                cal = mk()
                cal.load_state_dict(torch.load(buf))
            opt.zero_grad()
            cal.backward(losses(m, x, yu, yv))
            opt.step()
            out.append(m.enc.weight.grad.clone())
        return out

    for a, b in zip(run(-1), run(2)):
        assert torch.equal(a, b)


def test_laplace_needs_a_layer_per_source():
    m, x, yu, yv = setup()
    cal = GradientCalibrator(m.named_parameters(), samples=Laplace(layers={"u": m.head_u}))
    m.enc.weight.grad = torch.ones_like(m.enc.weight)
    with pytest.raises(ConfigError, match=r"Laplace\(layers=\).*'v'"):
        cal.backward(losses(m, x, yu, yv))
    assert bool((m.enc.weight.grad == 1).all())
    with pytest.raises(ConfigError, match="draws"):
        GradientCalibrator(m.parameters(), samples=Laplace(layers={"u": m.head_u}, draws=3))
