"""Every option is checked in one place: a ConfigError naming the argument, before any work."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from bogc_core.integrations.torch.options import validate_options  # noqa: E402
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
    ({"rho": 7}, "rho"),
    ({"rho": -0.1}, "rho"),
    ({"rho": True}, "rho"),
    ({"rho": "0.9"}, "rho"),
    ({"samples": "steps", "rho": 0.5}, "rho"),
    ({"samples": "nope"}, "samples"),
    ({"chunks": 1}, "chunks"),
    ({"chunks": 2.0}, "chunks"),
    ({"config": "default"}, "config"),
    ({"on_nonfinite": "skip"}, "on_nonfinite"),
    ({"diagnostics": "all"}, "diagnostics"),
    ({"diagnostics_every": 0}, "diagnostics_every"),
    ({"diagnostics_every": True}, "diagnostics_every"),
    ({"chunk_bytes": 0}, "chunk_bytes"),
    ({"timeout": 5}, "timeout"),
    ({"model": "net"}, "model"),
    ({"laplace_layers": {}}, "laplace_layers"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_option_is_a_config_error_naming_it(kw, arg):
    m = make()
    with pytest.raises(ConfigError, match=arg):
        GradientCalibrator(m.named_parameters(), **kw)


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


def test_validate_options_defaults():
    o = validate_options(None, "steps", 4, None, None, on_nonfinite="raise", diagnostics="summary",
                         diagnostics_every=50, chunk_bytes=1 << 20, timeout=None, keep_statistics=0)
    assert o.rho == 0.9 and isinstance(o.config, CalibrationConfig) and o.keep_statistics is False
