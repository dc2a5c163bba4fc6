"""Every option is checked when it is given: a ConfigError naming the argument, before any work."""

from __future__ import annotations

import inspect
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import (  # noqa: E402
    Diagnostics,
    Distributed,
    GradientCalibrator,
    Laplace,
    Microbatch,
    PerExample,
    Steps,
)
from torch import nn  # noqa: E402
from torchtools import batch, losses_of, make  # noqa: E402

from bogc_core import CalibrationConfig  # noqa: E402
from bogc_core.errors import ConfigError  # noqa: E402

BAD = [
    ({"source_weights": {"fusion": -1.0, "a": 1.0, "b": 1.0}}, "source_weights"),
    ({"source_weights": {"fusion": 1e308, "a": 1.0, "b": 1.0}}, "source_weights"),
    ({"source_weights": {"fusion": float("nan"), "a": 1.0, "b": 1.0}}, "source_weights"),
    ({"source_weights": {"fusion": None, "a": 1.0, "b": 1.0}}, "source_weights"),
    ({"source_weights": {"fusion": "ab", "a": 1.0, "b": 1.0}}, "source_weights"),
    ({"source_weights": 5}, "source_weights"),
    ({"source_weights": "ab"}, "source_weights"),
    ({"samples": "nope"}, "samples"),
    ({"samples": 4}, "samples"),
    ({"samples": "laplace"}, "Laplace"),
    ({"samples": Steps(rho=0.5)}, r"Steps\(rho=\)"),
    ({"config": "default"}, "config"),
    ({"on_nonfinite": "skip"}, "on_nonfinite"),
    ({"diagnostics": "all"}, "Diagnostics"),
    ({"diagnostics": 3}, "diagnostics"),
    ({"distributed": "gloo"}, "distributed"),
    ({"model": "net"}, "model"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_option_is_a_config_error_naming_it(kw, arg):
    m = make()
    with pytest.raises(ConfigError, match=arg):
        GradientCalibrator(m.named_parameters(), **kw)


def _heads():
    m = make()
    return {"a": m.head_a, "b": m.head_b}


# Every option object checks its options when built: (build, the argument named).
BAD_OBJECTS = [
    (lambda: Microbatch(chunks=1), r"Microbatch\(chunks=\)"),
    (lambda: Microbatch(chunks=2.0), r"Microbatch\(chunks=\)"),
    (lambda: Microbatch(chunks=True), r"Microbatch\(chunks=\)"),
    (lambda: Microbatch(rho=7), "rho"),
    (lambda: Microbatch(rho="0.9"), "rho"),
    (lambda: Microbatch(chunk_bytes=0), "chunk_bytes"),
    (lambda: PerExample(rho=-0.1), "rho"),
    (lambda: PerExample(rho=True), "rho"),
    (lambda: PerExample(chunk_bytes=1.5), "chunk_bytes"),
    (lambda: Steps(rho=None), r"Steps\(rho=\)"),
    (lambda: Steps(rho=1.5), r"Steps\(rho=\)"),
    (lambda: Laplace(), r"Laplace\(layers=\)"),
    (lambda: Laplace(layers={}), r"Laplace\(layers=\)"),
    (lambda: Laplace(layers={"a": "head"}), r"Laplace\(layers=\)\['a'\]"),
    (lambda: Laplace(layers={"a": nn.ReLU()}), r"Laplace\(layers=\)\['a'\]"),
    (lambda: Laplace(layers=_heads(), prior_precision=0.0), r"Laplace\(prior_precision=\)"),
    (lambda: Laplace(layers=_heads(), prior_precision=True), r"Laplace\(prior_precision=\)"),
    (lambda: Laplace(layers=_heads(), draws=3), r"Laplace\(draws=\)"),
    (lambda: Laplace(layers=_heads(), draws=0), r"Laplace\(draws=\)"),
    (lambda: Laplace(layers=_heads(), seed=1.5), r"Laplace\(seed=\)"),
    (lambda: Laplace(layers=_heads(), rho=2.0), "rho"),
    (lambda: Diagnostics(level="all"), r"Diagnostics\(level=\)"),
    (lambda: Diagnostics(every=0), r"Diagnostics\(every=\)"),
    (lambda: Diagnostics(every=True), r"Diagnostics\(every=\)"),
    (lambda: Diagnostics(keep_statistics=0), r"Diagnostics\(keep_statistics=\)"),
    (lambda: Distributed(timeout=5), r"Distributed\(timeout=\)"),
]


@pytest.mark.parametrize("build,arg", BAD_OBJECTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_OBJECTS)])
def test_each_option_object_checks_its_options(build, arg):
    with pytest.raises(ConfigError, match=arg):
        build()


def test_a_name_stands_for_the_sample_source_with_default_options():
    m = make()
    for name, cls in (("microbatch", Microbatch), ("per_example", PerExample), ("steps", Steps)):
        cal = GradientCalibrator(m.named_parameters(), samples=name)
        assert type(cal.samples) is cls and cal.samples.NAME == name
        assert cal.samples.options() == cls().options()
    assert GradientCalibrator(m.named_parameters()).samples.chunks == 4
    assert GradientCalibrator(m.named_parameters(), samples="steps").rho == 0.9
    assert GradientCalibrator(m.named_parameters(), diagnostics="full").diagnostics == Diagnostics("full")


def test_options_of_an_object_reach_the_calibrator():
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples=PerExample(rho=0.8, chunk_bytes=1 << 20),
                             distributed=Distributed(timeout=timedelta(seconds=3)),
                             diagnostics=Diagnostics(level="none", every=7, keep_statistics=True))
    assert cal.rho == 0.8 and cal.samples.chunk_bytes == 1 << 20
    assert cal.distributed.timeout == timedelta(seconds=3) and cal.distributed.group() is None
    assert cal.diagnostics == Diagnostics("none", 7, True)
    assert GradientCalibrator(m.named_parameters(), samples=Microbatch(3)).rho is None


def test_the_constructor_takes_at_most_eight_parameters():
    params = inspect.signature(GradientCalibrator).parameters
    assert len(params) <= 8, list(params)


def test_zero_source_weight_is_allowed_and_drops_the_source():
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), CalibrationConfig(gamma=0.0), samples="per_example",
                             source_weights={"fusion": 1.0, "a": 0.0, "b": 1.0})
    cal.backward(losses_of(m, xa, xb, y))
    assert torch.count_nonzero(m.head_a.weight.grad) == 0
    ls = losses_of(m, xa, xb, y)
    # Equal evidence: g = sum_k lambda_k grad(loss_k.mean()).
    want = torch.autograd.grad(ls["fusion"].mean() + ls["b"].mean(), m.enc_a.weight)[0]
    torch.testing.assert_close(m.enc_a.weight.grad, want)
