"""The flat workspace: one fused call per group of parameters, buffers reused across steps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, Steps  # noqa: E402
from bogc_core.integrations.torch import calibrator as cal_mod  # noqa: E402
from bogc_core.integrations.torch import per_example as pe_mod  # noqa: E402
from bogc_core.integrations.torch import samples as samples_mod  # noqa: E402
from bogc_core.integrations.torch import workspace as ws_mod  # noqa: E402
from torchtools import SOURCES, batch, loop_grads, losses_of, make, reference, stats_reference  # noqa: E402

from bogc_core import CalibrationConfig, calibrate_gradient  # noqa: E402


def _counting(monkeypatch):
    calls = []

    def spy(stats, config=None, **kw):
        calls.append({"sources": tuple(stats), "segments": kw.get("segments"), "out": kw.get("out"),
                      "D": int(next(iter(stats.values())).mean.shape[0])})
        return calibrate_gradient(stats, config, **kw)

    monkeypatch.setattr(ws_mod, "calibrate_gradient", spy)
    return calls


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_one_fused_call_per_group(scope, monkeypatch):
    # TwoModal: enc_a is reached by (fusion, a), enc_b by (fusion, b); every other
    # reached tensor by one source. Two calibrated groups -> two calls a step.
    m = make()
    xa, xb, y = batch(8)
    cfg = CalibrationConfig(scope=scope)
    cal = GradientCalibrator(m.named_parameters(), cfg, samples="per_example", model=m)
    calls = _counting(monkeypatch)
    cal.backward(losses_of(m, xa, xb, y))
    assert sorted(c["sources"] for c in calls) == [("fusion", "a"), ("fusion", "b")]
    sizes = {"a": [m.enc_a.weight.numel(), m.enc_a.bias.numel()],
             "b": [m.enc_b.weight.numel(), m.enc_b.bias.numel()]}
    for c in calls:
        want = sizes[c["sources"][1]]
        assert c["D"] == sum(want)
        assert c["segments"] == (want if scope == "tensor" else None)
        assert c["out"] is not None and c["out"].shape == (sum(want),)
    # Same result as calibrating every tensor on its own (tensor scope).
    if scope == "tensor":
        ref = reference(loop_grads(m, xa, xb, y))
        for n, p in m.named_parameters():
            if not n.startswith("unused"):
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12)


def test_workspace_buffers_are_reused_across_steps():
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    cal.backward(losses_of(m, *batch(8, seed=1)))
    ptrs = [(g.mean.data_ptr(), g.m2.data_ptr()) for g in cal._workspace.groups]
    # Parameters without a gradient take their part of the gradient buffer itself (no copy);
    # the workspace lets go of it.
    params = dict(m.named_parameters())
    for g in cal._workspace.groups:
        assert g.out is None
        grads = [params[cal._params[i][0]].grad for i in g.params]
        assert len({t.untyped_storage().data_ptr() for t in grads}) == 1
    held = {n: p.grad for n, p in params.items()}
    for seed in (2, 3):
        cal.backward(losses_of(m, *batch(8, seed=seed)))
        assert [(g.mean.data_ptr(), g.m2.data_ptr()) for g in cal._workspace.groups] == ptrs
        # Existing gradients are overwritten in place, and the workspace keeps its buffer.
        assert all(p.grad is held[n] for n, p in params.items())
        assert all(g.out is not None for g in cal._workspace.groups)
    # A source sitting a step out changes the layout; the buffers follow it.
    ls = losses_of(m, *batch(8, seed=4))
    ls["b"] = ls["b"][:0]
    cal.backward(ls)
    assert {g.sources for g in cal._workspace.groups} >= {("fusion", "a"), ("fusion",)}


def test_shortcut_writes_into_the_workspace():
    # With the shortcut every TwoModal statistic is written in place: after the
    # step the group buffers hold exactly the materialised statistics.
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m, diagnostics=Diagnostics(keep_statistics=True))
    copies = []
    real = ws_mod.Group.fill

    def fill(self, used):
        for k, s in enumerate(self.sources):
            for j, i in enumerate(self.params):
                dst = self.mean[k, self.offsets[j]:self.offsets[j] + self.sizes[j]]
                copies.append(used[s][i].mean.data_ptr() != dst.data_ptr())
        return real(self, used)

    ws_mod.Group.fill = fill
    try:
        cal.backward(losses_of(m, xa, xb, y))
    finally:
        ws_mod.Group.fill = real
    assert copies and not any(copies)
    G = loop_grads(m, xa, xb, y)
    for s in SOURCES:
        for n, g in G[s].items():
            torch.testing.assert_close(cal.last_statistics[s][n].mean, g.mean(0))


def test_a_source_costs_nothing_where_it_does_not_reach(monkeypatch):
    # The unimodal source "a" reaches enc_a and head_a only: the shortcut's
    # per-layer sums for enc_b, head_b and fusion are formed for other sources only.
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    seen: dict = {}
    real = samples_mod.use_deltas

    def spy(prob, sources, use):
        def seen_use(k, tap, G):
            seen.setdefault(tap.module, []).append(prob.names[k])
            assert G.shape[0] == prob.batch(k)
            use(k, tap, G)
        real(prob, sources, seen_use)

    monkeypatch.setattr(pe_mod, "use_deltas", spy)
    cal.backward(losses_of(m, *batch(8)))
    for v in seen.values():
        v.sort()
    assert seen[m.enc_a] == ["a", "fusion"]
    assert seen[m.enc_b] == ["b", "fusion"]
    assert seen[m.head_a] == ["a"]
    assert seen[m.fusion] == ["fusion"]


def test_diagnostics_are_sampled_every_k_steps(monkeypatch):
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m, diagnostics=Diagnostics(every=3))
    summaries = []
    real = cal_mod.group_entries

    def spy(*a, **k):
        summaries.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cal_mod, "group_entries", spy)
    sampled = []
    for step in range(7):
        before = len(summaries)
        d = cal.backward(losses_of(m, *batch(8, seed=step + 1)))
        sampled.append(d["sampled"])
        assert ("weight_mean" in d) == d["sampled"]
        assert (len(summaries) > before) == d["sampled"]
        assert d["num_calibrated"] == 4 and "warmup" in d and "counts" in d
    assert sampled == [True, False, False, True, False, False, True]


def test_diagnostics_none_never_summarises(monkeypatch):
    m = make()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m, diagnostics=Diagnostics(level="none", every=1))
    monkeypatch.setattr(cal_mod, "group_entries", lambda *a, **k: pytest.fail("summarised"))
    d = cal.backward(losses_of(m, *batch(8)))
    assert d["parameters"] == {} and not d["sampled"]


def test_group_with_different_carried_counts_per_tensor():
    # u and v both reach p and q from step 3 on, but q only from then: the carried
    # counts differ between the two tensors of one group (per-element counts).
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g))
    q = torch.nn.Parameter(torch.randn(2, dtype=torch.float64, generator=g))
    cal = GradientCalibrator([("p", p), ("q", q)], samples=Steps(rho=0.9), diagnostics=Diagnostics(every=1, keep_statistics=True))
    for step in range(5):
        x = torch.randn(4, dtype=torch.float64, generator=g)
        u = (p * x[:3]).sum() ** 2 + (0.0 if step < 2 else (q * x[3]).sum() ** 2)
        v = (p.sin() * x[1:]).sum() + (0.0 if step < 2 else (q.cos() * x[0]).sum())
        diag = cal.backward({"u": u, "v": v})
    groups = cal._workspace.groups
    assert len(groups) == 1 and groups[0].count_buf is not None
    per_param = {n: {s: cal.last_statistics[s][n] for s in ("u", "v")} for n in ("p", "q")}
    assert float(per_param["p"]["u"].count) != float(per_param["q"]["u"].count)
    want = stats_reference(per_param)
    torch.testing.assert_close(p.grad, want["p"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(q.grad, want["q"], rtol=1e-10, atol=1e-14)
    assert diag["num_calibrated"] == 2 and not diag["warmup"]
