"""samples="microbatch": micro-batch statistics against the loop reference."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator, Microbatch  # noqa: E402
from torchtools import (  # noqa: E402
    assert_grads,
    batch,
    chunk_means,
    loop_grads,
    losses_of,
    make,
    reference,
    stats_reference,
)

from bogc_core import (  # noqa: E402
    GradientStats,
)


@pytest.mark.parametrize("use_model", [False, True], ids=["generic", "linear_shortcut"])
def test_microbatch_matches_loop(use_model):
    m = make()
    xa, xb, y = batch(12)
    cal = GradientCalibrator(m.named_parameters(), samples=Microbatch(4), model=m if use_model else None)
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    ref = reference({s: {n: chunk_means(g, 4) for n, g in d.items()} for s, d in G.items()})
    assert_grads(m, ref)


def test_microbatch_unequal_chunks_are_weighted():
    # 10 examples in 4 chunks (3, 3, 2, 2): weights f_j = n_j * c / B keep the
    # mean equal to the full-batch gradient.
    m = make()
    xa, xb, y = batch(10)
    cal = GradientCalibrator(m.named_parameters(), samples=Microbatch(4), model=m)
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    per_param = {}
    for s, d in G.items():
        for n, g in d.items():
            parts = torch.tensor_split(g, 4)
            f = torch.tensor([len(p) * 4 / 10 for p in parts], dtype=g.dtype)
            cm = torch.stack([p.mean(0) for p in parts])
            fw = f.reshape((-1,) + (1,) * (g.dim() - 1))
            mean = (fw * cm).sum(0) / f.sum()
            torch.testing.assert_close(mean, g.mean(0))
            m2 = (fw * (cm - mean) ** 2).sum(0)
            per_param.setdefault(n, {})[s] = GradientStats(4.0, mean, m2)
    assert_grads(m, stats_reference(per_param))


def test_shared_buffer_for_small_tensors_gives_the_per_tensor_bits(monkeypatch):
    """Equal chunks of small tensors take their moments from one shared buffer; the result
    is bit-identical to each tensor's own accumulator (``SMALL = 0``: every tensor alone)."""
    from bogc_core.integrations.torch import Diagnostics
    from bogc_core.integrations.torch import microbatch as mb

    def statistics():
        m = make()
        xa, xb, y = batch(12)
        cal = GradientCalibrator(m.named_parameters(), samples=Microbatch(4), model=m,
                                 diagnostics=Diagnostics(keep_statistics=True))
        cal.backward(losses_of(m, xa, xb, y))
        return {s: {n: (st.count, st.mean.clone(), st.m2.clone()) for n, st in d.items()}
                for s, d in cal.last_statistics.items()}

    shared = statistics()
    monkeypatch.setattr(mb, "SMALL", 0)
    alone = statistics()
    assert shared.keys() == alone.keys()
    for s in shared:
        assert shared[s].keys() == alone[s].keys() and shared[s]
        for n, (c, mean, m2) in shared[s].items():
            c2, mean2, m22 = alone[s][n]
            assert float(c) == float(c2) == 4.0
            assert torch.equal(mean, mean2) and torch.equal(m2, m22), (s, n)
