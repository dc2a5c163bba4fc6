"""Bad inputs and failures: a BOGCError or a correct answer, and nothing changed on an error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from torchtools import (  # noqa: E402
    batch,
    losses_of,
    make,
)

from bogc_core import (  # noqa: E402
    BOGCError,
    NonFiniteError,
)
from bogc_core.errors import ConfigError, InsufficientSamplesError, ShapeError  # noqa: E402


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps"])
def test_error_changes_no_grad_and_no_state(samples):
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=samples, rho=0.9 if samples == "steps" else None)
    cal.backward(losses_of(m, xa, xb, y))
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    state = cal.state_dict()
    ls = losses_of(m, xa, xb, y)
    ls["b"] = ls["b"] * torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="losses\\['b'\\]"):
        cal.backward(ls)
    for n, p in m.named_parameters():
        if n in before:
            assert torch.equal(p.grad, before[n]), n
    after = cal.state_dict()
    if samples == "steps":
        for s, per in state["state"]["stats"].items():
            for n, t in per.items():
                assert torch.equal(after["state"]["stats"][s][n]["m2"], t["m2"])
        assert after["state"]["steps"] == state["state"]["steps"]


def test_insufficient_examples_raise_and_change_nothing():
    m = make()
    xa, xb, y = batch(1)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(InsufficientSamplesError, match="losses"):
        GradientCalibrator(m.named_parameters(), samples="per_example").backward(losses_of(m, xa, xb, y))
    assert all(bool((p.grad == 1).all()) for p in m.parameters())


def test_losses_are_not_mutated():
    m = make()
    xa, xb, y = batch(8)
    ls = losses_of(m, xa, xb, y)
    copies = {k: v.detach().clone() for k, v in ls.items()}
    GradientCalibrator(m.named_parameters(), samples="per_example", model=m).backward(ls)
    for k in ls:
        assert torch.equal(ls[k].detach(), copies[k])


# --------------------------------------------------------------- bad input


def test_bad_input_raises_bogc_errors():
    m = make()
    xa, xb, y = batch(8)
    with pytest.raises(ConfigError, match="samples"):
        GradientCalibrator(m.parameters(), samples="bogus")
    with pytest.raises(ConfigError, match="chunks"):
        GradientCalibrator(m.parameters(), chunks=1)
    with pytest.raises(ConfigError, match="rho"):
        GradientCalibrator(m.parameters(), samples="steps", rho=0.3)
    with pytest.raises(ConfigError, match="params"):
        GradientCalibrator([])
    with pytest.raises(ConfigError, match="laplace_layers"):
        GradientCalibrator(m.parameters(), samples="laplace")
    cal = GradientCalibrator(m.parameters())
    with pytest.raises(ShapeError, match="losses"):
        cal.backward({})
    ls = losses_of(m, xa, xb, y)
    with pytest.raises(ShapeError, match="per-example"):
        cal.backward({"a": ls["a"].mean(), "b": ls["b"]})
    with pytest.raises(ShapeError, match="require grad"):
        cal.backward({"a": ls["a"].detach()})
    cal = GradientCalibrator(m.parameters(), source_weights={"a": 1.0})
    with pytest.raises(ConfigError, match="source_weights"):
        cal.backward(losses_of(m, xa, xb, y))
    assert issubclass(ConfigError, BOGCError)
