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
    source,  # noqa: E402
)

from bogc_core.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("samples", ["steps", "microbatch"])
def test_resume_is_bit_identical(samples):
    def run(split):
        m = make(dtype=torch.float32)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        mk = lambda: GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9), model=m)  # noqa: E731
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


def _trained(samples="steps"):
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9), model=None)
    for seed in (1, 2):
        cal.backward(losses_of(m, *batch(8, seed=seed)))
    return m, cal


def _bytes(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _corrupt(kind: str, sd):
    st = sd["state"]["stats"]["a"]["head_a.weight"]
    if kind == "rho_out_of_range":
        sd["state"]["rho"] = 7.0
    elif kind == "rho_not_a_number":
        sd["state"]["rho"] = "0.9"
    elif kind == "negative_count":
        st["count"] = torch.tensor(-5.0, dtype=torch.float64)
    elif kind == "nan_m2":
        st["m2"] = st["m2"].clone().fill_(float("nan"))
    elif kind == "negative_m2":
        st["m2"] = -st["m2"].abs() - 1.0
    elif kind == "inf_mean":
        st["mean"] = st["mean"].clone().fill_(float("inf"))
    elif kind == "missing_moment":
        del st["m2"]
    elif kind == "wrong_shape_m2":
        st["m2"] = st["m2"][:1]
    elif kind == "negative_steps":
        sd["state"]["steps"] = -1
    elif kind == "generator_garbage":
        sd["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif kind == "generator_not_a_tensor":
        sd["generator"] = [1, 2, 3]
    return sd


KINDS = ["rho_out_of_range", "rho_not_a_number", "negative_count", "nan_m2", "negative_m2", "inf_mean",
         "missing_moment", "wrong_shape_m2", "negative_steps", "generator_garbage", "generator_not_a_tensor"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_validates_everything_and_changes_nothing(kind):
    m, cal = _trained()
    good = cal.state_dict()
    before = _bytes(cal.state_dict())
    bad = _corrupt(kind, cal.state_dict())
    with pytest.raises(ConfigError, match="state_dict"):
        cal.load_state_dict(bad)
    assert _bytes(cal.state_dict()) == before
    assert cal.rho == 0.9
    cal.load_state_dict(good)  # the calibrator still loads a good checkpoint


def test_load_state_dict_restores_rho_and_steps():
    m, cal = _trained()
    sd = cal.state_dict()
    sd["state"]["rho"] = 0.8
    m2, cal2 = _trained()
    cal2.load_state_dict(sd)
    assert cal2.rho == 0.8 and cal2.state_dict()["state"]["rho"] == 0.8
    assert cal2.state_dict()["state"]["steps"] == 2
