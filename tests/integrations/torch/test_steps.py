"""samples="steps": one sample per step, carried with forgetting."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator, Steps  # noqa: E402
from torchtools import (  # noqa: E402
    assert_grads,
    batch,
    loop_grads,
    losses_of,
    make,
    stats_reference,
)

from bogc_core import (  # noqa: E402
    GradientStats,
)


def test_steps_match_loop_with_forgetting():
    m = make()
    rho = 0.8
    cal = GradientCalibrator(m.named_parameters(), samples=Steps(rho=rho))
    acc: dict[tuple[str, str], GradientStats] = {}
    for step in range(5):
        xa, xb, y = batch(6, seed=10 + step)
        diag = cal.backward(losses_of(m, xa, xb, y))
        G = loop_grads(m, xa, xb, y)
        per_param = {}
        for s, d in G.items():
            for n, g in d.items():
                new = GradientStats(1.0, g.mean(0), torch.zeros_like(g[0]))
                key = (s, n)
                acc[key] = new if key not in acc else acc[key].decay(rho).merge(new)
                per_param.setdefault(n, {})[s] = GradientStats(acc[key].count, g.mean(0), acc[key].m2)
        counts = 1 + sum(rho ** j for j in range(1, step + 1))
        assert diag["warmup"] == (counts < 2)
        if counts < 2:
            # Warm-up: the plain summed gradient.
            ref = {n: sum(st.mean for st in srcs.values()) for n, srcs in per_param.items()}
        else:
            ref = stats_reference(per_param)
        assert_grads(m, ref)


def test_steps_accepts_scalar_losses():
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples=Steps(rho=0.9))
    for step in range(4):
        xa, xb, y = batch(6, seed=step)
        ls = {k: v.mean() for k, v in losses_of(m, xa, xb, y).items()}
        cal.backward(ls)
    G = loop_grads(m, xa, xb, y)
    torch.testing.assert_close(m.head_a.weight.grad, G["a"]["head_a.weight"].mean(0))
