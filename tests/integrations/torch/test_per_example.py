"""samples="per_example": exact per-example statistics, generic and per-layer shortcut."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, PerExample  # noqa: E402
from bogc_core.integrations.torch.shortcut import Tap, per_example_sums  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import (  # noqa: E402
    SOURCES,
    ConvTwoModal,
    assert_grads,
    batch,
    chunk_means,
    loop_grads,
    losses_of,
    make,
    reference,
    source,  # noqa: E402
    stats_reference,
)

from bogc_core import (  # noqa: E402
    GradientStats,
)


@pytest.mark.parametrize("use_model", [False, True], ids=["generic", "linear_shortcut"])
def test_per_example_matches_loop(use_model):
    m = make()
    xa, xb, y = batch(10)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example",
                             model=m if use_model else None)
    diag = cal.backward(losses_of(m, xa, xb, y))
    assert_grads(m, reference(loop_grads(m, xa, xb, y)))
    assert diag["num_calibrated"] == 4  # both encoders' weight and bias
    if use_model:
        assert "enc_a.weight" in diag["shortcut_parameters"]
    else:
        assert diag["shortcut_parameters"] == []


def test_per_example_small_chunks_match_loop():
    # Two gradient rows per batched backward: the chunked merge must be exact.
    m = make()
    xa, xb, y = batch(7)
    cal = GradientCalibrator(m.named_parameters(), samples=PerExample(chunk_bytes=2 * 8 * 120))
    cal.backward(losses_of(m, xa, xb, y))
    assert_grads(m, reference(loop_grads(m, xa, xb, y)))


def test_inplace_activation_falls_back_to_exact_path():
    # ReLU(inplace=True) rewrites the Linear outputs: the shortcut must not be used.
    m = make(inplace_relu=True)
    xa, xb, y = batch(10)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    diag = cal.backward(losses_of(m, xa, xb, y))
    assert "enc_a.weight" not in diag["shortcut_parameters"]
    assert_grads(m, reference(loop_grads(m, xa, xb, y)))


def test_tied_weight_falls_back_to_exact_path():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    head = nn.Linear(4, 2).double()
    model = nn.ModuleDict({"lin": lin, "head": head})
    x = torch.randn(6, 4, dtype=torch.float64)

    def ls():
        h = torch.tanh(lin(x))
        h2 = torch.tanh(h @ lin.weight.T)  # the weight used a second time, outside the layer
        return {"u": head(h).pow(2).sum(1), "v": head(h2).sum(1)}

    cal = GradientCalibrator(model.named_parameters(), samples="per_example", model=model)
    cal.backward(ls())
    # Source "u" reaches lin.weight through the layer only (shortcut), "v" also
    # through the second use (exact per-example path); both must be exact.
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    samples = {"u": {}, "v": {}}
    for i in range(6):
        for s in ("u", "v"):
            gs = torch.autograd.grad(ls()[s][i], params, allow_unused=True)
            for n, g in zip(names, gs):
                samples[s].setdefault(n, []).append(g)
    ref = reference({s: {n: torch.stack(v) for n, v in d.items()} for s, d in samples.items()})
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------ the Linear shortcut


def test_linear_shortcut_sums_match_materialised():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 7, generator=g, dtype=torch.float64)
    d = torch.randn(33, 5, generator=g, dtype=torch.float64)
    per = torch.einsum("bo,bi->boi", d, x)  # materialised per-example weight gradients
    sums = per_example_sums(x, d, True, True)
    torch.testing.assert_close(sums["weight"][0], per.sum(0))
    torch.testing.assert_close(sums["weight"][1], (per ** 2).sum(0))
    torch.testing.assert_close(sums["bias"][0], d.sum(0))
    torch.testing.assert_close(sums["bias"][1], (d ** 2).sum(0))
    # float32: the sums agree to float32 resolution, and the M2 they give is
    # within a bound of the float64 one (loss ~ eps * n * m^2 per dimension).
    s32 = per_example_sums(x.float(), d.float(), True, False)["weight"]
    st32 = GradientStats.from_sums(33.0, *s32)
    st64 = GradientStats.from_samples(per)
    bound = 64 * torch.finfo(torch.float32).eps * (per ** 2).sum(0)
    assert bool(((st32.m2.double() - st64.m2).abs() <= bound).all())


def test_shortcut_stats_match_materialised_in_calibrator():
    m = make()
    xa, xb, y = batch(9)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m, diagnostics=Diagnostics(keep_statistics=True))
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    for s in SOURCES:
        for n, st in cal.last_statistics[s].items():
            g = G[s][n]
            torch.testing.assert_close(st.mean, g.mean(0))
            torch.testing.assert_close(st.m2, ((g - g.mean(0)) ** 2).sum(0), rtol=1e-7, atol=1e-12)
            assert float(st.count) == 9.0


def test_stale_forward_does_not_disable_or_corrupt_shortcut():
    # A forward whose loss never reaches this calibrator (another calibrator's
    # step, a diagnostic pass with grad enabled) must be ignored.
    m = make()
    xa, xb, y = batch(9)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    stale = losses_of(m, 2 * xa, xb, y)  # recorded, never passed to backward
    diag = cal.backward(losses_of(m, xa, xb, y))
    assert "enc_a.weight" in diag["shortcut_parameters"]
    assert_grads(m, reference(loop_grads(m, xa, xb, y)))
    del stale


def test_layer_called_twice_uses_exact_path():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def ls():
        h = torch.tanh(lin(x))
        h2 = lin(h)  # the same layer twice in one graph
        return {"u": h.pow(2).sum(1), "v": h2.sum(1)}

    cal = GradientCalibrator(lin.named_parameters(), samples="per_example", model=lin)
    diag = cal.backward(ls())
    assert diag["shortcut_parameters"] == []
    params = list(lin.parameters())
    G = {"u": {}, "v": {}}
    for i in range(6):
        for s in ("u", "v"):
            for (n, _), g in zip(lin.named_parameters(), torch.autograd.grad(ls()[s][i], params)):
                G[s].setdefault(n, []).append(g)
    ref = reference({s: {n: torch.stack(v) for n, v in d.items()} for s, d in G.items()})
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("samples", ["per_example", "microbatch"])
def test_conv2d_shortcut_matches_loop(samples):
    torch.manual_seed(0)
    m = ConvTwoModal().double()
    g = torch.Generator().manual_seed(5)
    img = torch.randn(10, 2, 8, 10, generator=g, dtype=torch.float64)
    vec = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    ce = nn.CrossEntropyLoss(reduction="none")

    def ls(i=slice(None)):
        f, a, b = m(img[i], vec[i])
        return {"fusion": ce(f, y[i]), "a": ce(a, y[i]), "b": ce(b, y[i])}

    # chunk_bytes small enough that the per-example conv gradients come in several blocks.
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, chunks=3, chunk_bytes=300), model=m)
    diag = cal.backward(ls())
    assert {"conv1.weight", "conv1.bias", "conv2.weight"} <= set(diag["shortcut_parameters"])
    names = [n for n, _ in m.named_parameters()]
    G = {s: {} for s in ("fusion", "a", "b")}
    for i in range(10):
        li = ls(slice(i, i + 1))
        for s in G:
            for n, gr in zip(names, torch.autograd.grad(li[s][0], list(m.parameters()),
                                                        allow_unused=True, retain_graph=True)):
                if gr is not None:
                    G[s].setdefault(n, []).append(gr)
    G = {s: {n: torch.stack(v) for n, v in d.items()} for s, d in G.items()}
    if samples == "microbatch":
        G = {s: {n: chunk_means(x, 3) for n, x in d.items()} for s, d in G.items()}
        # 10 examples in 3 chunks (4, 3, 3): the weighted statistics.
        per_param = {}
        for s, d in G.items():
            for n, cm in d.items():
                f = torch.tensor([4 * 3 / 10, 3 * 3 / 10, 3 * 3 / 10], dtype=cm.dtype)
                fw = f.reshape((-1,) + (1,) * (cm.dim() - 1))
                mean = (fw * cm).sum(0) / f.sum()
                per_param.setdefault(n, {})[s] = GradientStats(3.0, mean, (fw * (cm - mean) ** 2).sum(0))
        ref = stats_reference(per_param)
    else:
        ref = reference(G)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12, msg=n)


def _chain():
    # x -> l1 -> relu -> (l2, l3) -> loss, plus a branch v -> l4 -> loss of its own input.
    torch.manual_seed(0)
    l1, l2, l3, l4 = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3), nn.Linear(2, 3)
    x, v = torch.randn(6, 4), torch.randn(6, 2)
    y1 = l1(x)
    z = torch.relu(y1)
    y2, y3, y4 = l2(z), l3(z), l4(v)
    loss = (y2 * y3).sum(dim=1) + y4.pow(2).sum(dim=1) + z.sum(dim=1)
    # Calls the loss does not reach: one above l1, one with nothing below.
    calls = ((l1, x, y1), (l2, z, y2), (l3, z, y3), (l4, v, y4), (l2, z, l2(z)), (l4, v, l4(v)))
    taps = [Tap(m, i.detach(), o, o._version, None, None) for m, i, o in calls]
    return loss, taps[:4], taps[4:]


def test_lowest_outputs_have_no_other_output_below():
    from bogc_core.integrations.torch.samples import _lowest

    _, taps, _ = _chain()
    y1, y2, y3, y4 = (t.out for t in taps)
    assert _lowest([y1, y2, y3, y4]) == {id(y1), id(y4)}
    assert _lowest([y2, y3, y4]) == {id(y2), id(y3), id(y4)}
    assert _lowest([y1]) == {id(y1)}


def test_use_deltas_hands_each_layer_its_output_gradient_as_the_backward_passes_it():
    from bogc_core.integrations.torch.samples import Problem, use_deltas

    loss, taps, off = _chain()
    every = taps + off
    prob = Problem(["s"], [loss], [], [set()], [every])
    got: list = []
    use_deltas(prob, [0], lambda k, tap, d: got.append((tap, d.clone())))
    order = [next(j for j, t in enumerate(every) if t is tap) for tap, _ in got]
    # The upper layers come from hooks during the backward, before the lowest ones it returns;
    # the unreached call above a lowest layer gets zeros, last.
    assert sorted(order) == [0, 1, 2, 3, 4, 5] and set(order[:2]) == {1, 2} and order[-1] == 4
    for tap, d in got:
        if any(tap is t for t in off):
            assert not d.any()
        else:
            ref, = torch.autograd.grad(loss.sum(), tap.out, retain_graph=True)
            torch.testing.assert_close(d, ref)
