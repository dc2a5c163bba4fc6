"""state_dict / load_state_dict: bit-identical resume, validation and atomic commit."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import (  # noqa: E402
    batch,
    losses_of,
    make,
)

from bogc_core.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("samples", ["steps", "microbatch"])
def test_resume_is_bit_identical(samples):
    def run(split):
        m = make(dtype=torch.float32)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        mk = lambda: GradientCalibrator(m.named_parameters(), samples=samples, rho=0.9, model=m)  # noqa: E731
        cal = mk()
        grads = []
        for step in range(6):
            if step == split:
                buf = io.BytesIO()
                torch.save({"cal": cal.state_dict(), "opt": opt.state_dict(), "model": m.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf)
                m.load_state_dict(ck["model"])
                cal = mk()
                cal.load_state_dict(ck["cal"])
                opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                opt.load_state_dict(ck["opt"])
            xa, xb, y = batch(8, seed=step, dtype=torch.float32)
            opt.zero_grad()
            cal.backward(losses_of(m, xa, xb, y))
            opt.step()
            grads.append(torch.cat([p.grad.reshape(-1) for n, p in m.named_parameters() if p.grad is not None]))
        return grads, [p.detach().clone() for p in m.parameters()]

    g1, p1 = run(split=-1)
    g2, p2 = run(split=3)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_model():
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples="steps")
    cal.backward(losses_of(m, xa, xb, y))
    other = GradientCalibrator([("w", nn.Parameter(torch.zeros(2)))], samples="steps")
    with pytest.raises(ConfigError, match="state_dict"):
        other.load_state_dict(cal.state_dict())
    with pytest.raises(ConfigError, match="samples"):
        GradientCalibrator(m.named_parameters()).load_state_dict(cal.state_dict())


# ------------------------------------------------ optimizers, clipping, AMP
