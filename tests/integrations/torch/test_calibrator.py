"""GradientCalibrator end to end: options, diagnostics, scaling, training."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import (  # noqa: E402
    SOURCES,
    assert_grads,
    batch,
    chunk_means,
    loop_grads,
    losses_of,
    make,
    reference,
    source,  # noqa: E402
)

from bogc_core import (  # noqa: E402
    CalibrationConfig,
    GradientStats,
    calibrate_tensors,
)


def test_global_scope_matches_calibrate_tensors():
    m = make()
    xa, xb, y = batch(8)
    cfg = CalibrationConfig(scope="global")
    cal = GradientCalibrator(m.named_parameters(), cfg, samples="per_example", model=m)
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    multi = ["enc_a.weight", "enc_a.bias", "enc_b.weight", "enc_b.bias"]
    per = [{s: GradientStats.from_samples(G[s][n]) for s in SOURCES if n in G[s]} for n in multi]
    for n, c in zip(multi, calibrate_tensors(per, cfg)):
        torch.testing.assert_close(dict(m.named_parameters())[n].grad, c.gradient)


def test_equal_evidence_gives_plain_summed_gradient():
    # gamma = 0 makes every evidence 1: g_hat = sum_k grad(loss_k.mean()).
    m = make()
    xa, xb, y = batch(9)
    ls = losses_of(m, xa, xb, y)
    sum(v.mean() for v in ls.values()).backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    for samples in ("per_example", "microbatch", "steps"):
        cal = GradientCalibrator(m.named_parameters(), CalibrationConfig(gamma=0.0), samples=source(samples, chunks=3, rho=1.0), model=m)
        for _ in range(2):  # steps: leave warm-up
            cal.backward(losses_of(m, xa, xb, y))
        for n, g in plain.items():
            torch.testing.assert_close(dict(m.named_parameters())[n].grad, g, msg=f"{samples} {n}")


def test_source_weights_scale_single_source_and_calibrated():
    m = make()
    xa, xb, y = batch(8)
    lam = {"fusion": 1.0, "a": 0.5, "b": 2.0}
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", source_weights=lam)
    cal.backward(losses_of(m, xa, xb, y))
    assert_grads(m, reference(loop_grads(m, xa, xb, y), lam=lam))


def test_single_source_and_unreached_parameters():
    m = make()
    xa, xb, y = batch(8)
    sentinel = torch.full_like(m.unused.weight, 7.0)
    m.unused.weight.grad = sentinel.clone()
    cal = GradientCalibrator(m.named_parameters(), samples="microbatch")
    diag = cal.backward(losses_of(m, xa, xb, y))
    assert torch.equal(m.unused.weight.grad, sentinel)
    assert m.unused.bias.grad is None
    ls = losses_of(m, xa, xb, y)
    g = torch.autograd.grad(ls["a"].mean(), m.head_a.weight)[0]
    torch.testing.assert_close(m.head_a.weight.grad, g)
    assert diag["parameters"]["head_a.weight"]["single_source"] == "a"
    assert "unused.weight" not in diag["parameters"]


def test_diagnostics_are_plain_values():
    m = make()
    xa, xb, y = batch(8)
    diag = GradientCalibrator(m.named_parameters()).backward(losses_of(m, xa, xb, y))

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return isinstance(x, (int, float, bool, str)) or x is None

    assert plain(diag)
    assert set(diag["weight_mean"]) == set(SOURCES)
    # Each source's weight is averaged over the dimensions it reaches, not over all.
    numel = {n: p.numel() for n, p in m.named_parameters()}
    for s in SOURCES:
        mine = {n: e for n, e in diag["parameters"].items()
                if "weight_mean" in e and s in e["weight_mean"]}
        dims = sum(numel[n] for n in mine)
        expect = sum(numel[n] * e["weight_mean"][s] for n, e in mine.items()) / dims
        assert math.isclose(diag["weight_mean"][s], expect, rel_tol=1e-9)
        assert diag["dimensions"][s] == dims
    assert sum(diag["weight_mean"].values()) > 1.0  # the unimodal sources reach fewer dimensions


def test_empty_source_sits_out():
    m = make()
    xa, xb, y = batch(8)
    ls = losses_of(m, xa, xb, y)
    ls["b"] = ls["b"][:0]
    diag = GradientCalibrator(m.named_parameters(), samples="per_example").backward(ls)
    assert diag["sources"] == ["fusion", "a"]
    G = loop_grads(m, xa, xb, y)
    del G["b"]
    ref = reference(G)
    for n, p in m.named_parameters():
        if n.startswith(("head_b", "unused")):
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12)
    # enc_b is reached by the fusion loss only now: its plain gradient.
    assert diag["parameters"]["enc_b.weight"]["single_source"] == "fusion"


# -------------------------------------------------------- state and resume


def test_training_with_optimizer_and_clipping_reduces_loss():
    m = make(dtype=torch.float32)
    xa, xb, _ = batch(64, dtype=torch.float32)
    y = (xa[:, :3] + xb[:, :3]).argmax(dim=1)  # learnable from either modality
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    cal = GradientCalibrator(m.named_parameters(), samples="microbatch", model=m)
    first = None
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        ls = losses_of(m, xa, xb, y)
        total = float(sum(v.detach().mean() for v in ls.values()))
        first = total if first is None else first
        cal.backward(ls)
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1.0)
        assert math.isfinite(float(norm))
        clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters() if p.grad is not None))
        assert float(clipped) <= 1.0 + 1e-5
        opt.step()
    assert total < 0.5 * first


def test_grad_scaler_scales_grads_and_skips_nonfinite_steps():
    m = make(dtype=torch.float32)
    xa, xb, y = batch(16, dtype=torch.float32)
    ref = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    ref.backward(losses_of(m, xa, xb, y))
    expected = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    opt.zero_grad()
    cal.backward(losses_of(m, xa, xb, y), grad_scaler=scaler)
    for n, g in expected.items():
        p = dict(m.named_parameters())[n]
        torch.testing.assert_close(p.grad / 2.0 ** 12, g, rtol=1e-4, atol=1e-7)
    scaler.unscale_(opt)
    for n, g in expected.items():
        torch.testing.assert_close(dict(m.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-7)
    scaler.step(opt)
    scaler.update()

    # An overflowing loss: no error, inf grads, the scaler skips the step.
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    ls = losses_of(m, xa, xb, y)
    ls["a"] = ls["a"] * float("inf")
    diag = cal.backward(ls, grad_scaler=scaler)
    assert diag["nonfinite"]
    scaler.step(opt)
    scaler.update()
    for a, p in zip(before, m.parameters()):
        assert torch.equal(a, p.detach())
    assert scaler.get_scale() < 2.0 ** 12


def test_autocast_bfloat16_forward():
    m = make(dtype=torch.float32)
    xa, xb, y = batch(16, dtype=torch.float32)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ls = losses_of(m, xa, xb, y)
    diag = cal.backward({k: v.float() for k, v in ls.items()})
    assert diag["shortcut_parameters"]
    ref = GradientCalibrator(m.named_parameters(), samples="per_example")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ls = losses_of(m, xa, xb, y)
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    ref.backward({k: v.float() for k, v in ls.items()})
    for n, g in got.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, dict(m.named_parameters())[n].grad, rtol=2e-2, atol=1e-3)


def test_parameters_sharing_one_gradient_tensor():
    # out = x W^T + b1 + b2 with per-row offsets b (no broadcasting): autograd hands
    # the very same gradient tensor to b1 and b2; the in-place statistics must not
    # let one corrupt the other.
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False).double()
    b1 = nn.Parameter(0.1 * torch.randn(8, 2, dtype=torch.float64))
    b2 = nn.Parameter(0.1 * torch.randn(8, 2, dtype=torch.float64))
    x = torch.randn(8, 3, dtype=torch.float64)
    params = [("w", lin.weight), ("b1", b1), ("b2", b2)]

    def ls():
        out = lin(x) + b1 + b2
        return {"u": out.pow(2).sum(1), "v": torch.sin(out).sum(1)}

    for samples in ("per_example", "microbatch"):
        cal = GradientCalibrator(params, samples=source(samples, chunks=4))
        cal.backward(ls())
        torch.testing.assert_close(b1.grad, b2.grad)
        samples_ = {"u": {}, "v": {}}
        for i in range(8):
            for s in ("u", "v"):
                gs = torch.autograd.grad(ls()[s][i], [p for _, p in params])
                for (n, _), g in zip(params, gs):
                    samples_[s].setdefault(n, []).append(g)
        G = {s: {n: torch.stack(v) for n, v in d.items()} for s, d in samples_.items()}
        if samples == "microbatch":
            G = {s: {n: chunk_means(g, 4) for n, g in d.items()} for s, d in G.items()}
        ref = reference(G)
        for n, p in params:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12, msg=f"{samples} {n}")


@pytest.mark.parametrize("level", ["full", "none"])
def test_diagnostics_levels(level):
    m = make()
    xa, xb, y = batch(8)
    diag = GradientCalibrator(m.named_parameters(), diagnostics=level).backward(losses_of(m, xa, xb, y))
    if level == "none":
        assert diag["parameters"] == {} and "weight_mean" not in diag
        assert diag["num_calibrated"] == 4
    else:
        entry = diag["parameters"]["enc_a.weight"]
        assert "weight_top_fraction" in entry  # the core's complete diagnostics
        assert math.isclose(sum(entry["weight_mean"].values()), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("samples,use_model", [("per_example", True), ("microbatch", True),
                                               ("microbatch", False), ("steps", False)])
def test_backward_passes_do_not_grow_with_the_batch(samples, use_model, monkeypatch):
    # Every parameter of TwoModal is a Linear weight or bias: with the shortcut the
    # statistics come from one (unbatched) backward per source to the layer outputs;
    # without it, the micro-batch rows of all sources fit one batched call.
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9 if samples == "steps" else None), model=m if use_model else None)
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    cal.backward(losses_of(m, xa, xb, y))
    assert calls == ([False] * len(SOURCES) if use_model else [True])
