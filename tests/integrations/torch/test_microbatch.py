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


def _statistics():
    from bogc_core.integrations.torch import Diagnostics

    m = make()
    xa, xb, y = batch(12)
    cal = GradientCalibrator(m.named_parameters(), samples=Microbatch(4), model=m,
                             diagnostics=Diagnostics(keep_statistics=True))
    cal.backward(losses_of(m, xa, xb, y))
    return {s: {n: (st.count, st.mean.clone(), st.m2.clone()) for n, st in d.items()}
            for s, d in cal.last_statistics.items()}


def _assert_same_statistics(a, b, exact: bool) -> None:
    """Two runs' ``(count, mean, m2)`` per source and parameter: the same bits (``exact``) or
    equal to round-off; four chunks each."""
    assert a.keys() == b.keys()
    for s in a:
        assert a[s].keys() == b[s].keys() and a[s]
        for n, (c, mean, m2) in a[s].items():
            c2, mean2, m22 = b[s][n]
            assert float(c) == float(c2) == 4.0
            if exact:
                assert torch.equal(mean, mean2) and torch.equal(m2, m22), (s, n)
            else:
                torch.testing.assert_close(mean, mean2, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(m2, m22, rtol=1e-5, atol=1e-9)


def test_shared_buffer_for_small_tensors_gives_the_per_tensor_bits(monkeypatch):
    """Without the compiled loop, equal chunks of small tensors take their moments from one
    shared buffer; the result is bit-identical to each tensor's own accumulator
    (``SMALL = 0``: every tensor alone)."""
    from bogc_core.backends import _numba_kernel
    from bogc_core.integrations.torch import microbatch as mb

    monkeypatch.setattr(_numba_kernel, "ENABLED", [False])
    shared = _statistics()
    monkeypatch.setattr(mb, "SMALL", 0)
    alone = _statistics()
    _assert_same_statistics(shared, alone, exact=True)


def test_compiled_moments_equal_the_torch_ones_and_go_into_the_buffers(monkeypatch):
    """Where numba is installed, the moments of equal chunks come from the compiled loop,
    written straight into the calibrator's flat buffers, and equal the torch moments to
    round-off."""
    from bogc_core.backends import _numba_kernel
    from bogc_core.integrations.torch import microbatch as mb

    if not _numba_kernel.AVAILABLE:
        pytest.skip("numba not installed (it comes with the torch extra, or [fast])")
    written = []
    real = mb.chunk_moments

    def spy(g, inv, mean, m2):
        written.append((mean.data_ptr(), m2.data_ptr()))
        return real(g, inv, mean, m2)

    monkeypatch.setattr(mb, "chunk_moments", spy)
    m = make()
    xa, xb, y = batch(12)
    cal = GradientCalibrator(m.named_parameters(), samples=Microbatch(4), model=m)
    cal.backward(losses_of(m, xa, xb, y))
    n_shortcut = sum(p.numel() > 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear)
                     for p in mod.parameters())
    assert len(written) >= n_shortcut  # every Linear tensor of every source that reaches it

    def inside(ptr, buf):
        lo = buf.data_ptr()
        return lo <= ptr < lo + buf.numel() * buf.element_size()

    groups = cal._workspace.groups
    assert all(any(inside(pm, g.mean) and inside(pv, g.m2) for g in groups) for pm, pv in written)
    compiled = _statistics()
    monkeypatch.setattr(_numba_kernel, "ENABLED", [False])
    plain = _statistics()
    _assert_same_statistics(compiled, plain, exact=False)
