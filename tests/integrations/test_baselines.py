"""Methods of ``bogc bench`` on built-to-order inputs, checked against closed forms and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from bogc_core.integrations.bench.methods import build
from bogc_core.integrations.bench.methods.bogc import BOGC, INVERSE_VARIANCE
from bogc_core.integrations.bench.methods.mgda import min_norm, min_norm_2
from bogc_core.integrations.bench.methods.mmpareto import mmpareto
from bogc_core.integrations.bench.methods.ogm_ge import (
    OGMGE,
    OGMGEDominantNoise,
    coefficients,
    in_window,
)
from bogc_core.integrations.bench.methods.pcgrad import pcgrad
from bogc_core.integrations.bench.model import MultiModalNet

from bogc_core import CalibrationConfig, GradientStats, calibrate

torch.set_default_dtype(torch.float32)


def _problem(seed=0, dims=None, B=16):
    torch.manual_seed(seed)
    dims = dims or {"a": 5, "b": 3}
    model = MultiModalNet(dims, 3, hidden=8, feat=4)
    xs = [torch.randn(B, d) for d in dims.values()]
    y = torch.randint(0, 3, (B,))
    return model, xs, y


def _losses(model, xs, y):
    z, zs = model(xs)
    losses = {"fusion": F.cross_entropy(z, y, reduction="none")}
    for m, u in zip(model.modalities, zs):
        losses[m] = F.cross_entropy(u, y, reduction="none")
    return losses, (z, zs)


def _plain_source_grads(model, xs, y):
    """Per-source gradients by independent backward passes (one fresh graph each)."""
    out = {}
    for s in model.sources:
        model.zero_grad(set_to_none=True)
        losses, _ = _losses(model, xs, y)
        losses[s].mean().backward()
        out[s] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------- PCGrad
def test_pcgrad_two_conflicting_vectors_closed_form():
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])
    # g1 - (g1.g2)/|g2|^2 g2 = [1,0] + 1/2 [-1,1];  g2 - (g2.g1)/|g1|^2 g1 = [-1,1] + [1,0]
    expected = torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0])
    out = pcgrad([g1, g2])
    assert torch.allclose(out, expected)
    # each projected gradient is orthogonal to the other original one
    assert torch.dot(torch.tensor([0.5, 0.5]), g2) == 0


def test_pcgrad_without_conflict_is_the_sum():
    g = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, 0.1, 3.0])]
    assert torch.allclose(pcgrad(g), g[0] + g[1])


# ---------------------------------------------------------------- MGDA
@pytest.mark.parametrize("seed", range(5))
def test_mgda_min_norm_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    g1 = torch.tensor(rng.normal(size=7))
    g2 = torch.tensor(rng.normal(size=7) - (1.5 if seed % 2 else 0.0))
    a = min_norm_2(g1, g2)
    grid = np.linspace(0, 1, 100001)
    norms = np.linalg.norm(grid[:, None] * g1.numpy() + (1 - grid[:, None]) * g2.numpy(), axis=1)
    assert abs(a - grid[int(np.argmin(norms))]) < 1e-4


def test_mgda_clips_to_the_shorter_vector():
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([3.0, 0.0])  # min norm of the segment is g1 itself
    assert min_norm_2(g1, g2) == 1.0


def _simplex_min_norm(G: np.ndarray) -> float:
    """Brute force: the smallest ||G^T a||^2 over the simplex, by SLSQP from every vertex and the centre."""
    S = G.shape[0]
    best = math.inf
    for x0 in [np.eye(S)[i] for i in range(S)] + [np.full(S, 1.0 / S)]:
        r = scipy.optimize.minimize(lambda a: float(np.sum((a @ G) ** 2)), x0, method="SLSQP",
                                    bounds=[(0, 1)] * S, options={"ftol": 1e-15, "maxiter": 500},
                                    constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}])
        best = min(best, float(np.sum((np.clip(r.x, 0, 1) / np.clip(r.x, 0, 1).sum() @ G) ** 2)))
    return best


@pytest.mark.parametrize("S, seed", [(2, 0), (2, 1), (3, 2), (3, 3), (4, 4), (6, 5)])
def test_frank_wolfe_min_norm_matches_brute_force(S, seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(S, 8))
    if seed % 2:
        G[1] = -0.7 * G[0] + 0.05 * G[1]  # strongly conflicting pair
    alpha = min_norm(torch.tensor(G @ G.T)).numpy()  # the defaults the method uses
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    got = float(np.sum((alpha @ G) ** 2))
    ref = _simplex_min_norm(G)
    assert got >= ref - 1e-9  # no point of the simplex beats the optimum
    # Frank-Wolfe alone converges as O(1/k); the exact solve on its face reaches the optimum
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-12)
    if S == 2:  # closed form, exact
        assert alpha[0] == pytest.approx(min_norm_2(torch.tensor(G[0]), torch.tensor(G[1])))


@pytest.mark.parametrize("n, seed", [(1, 0), (2, 1), (3, 2), (5, 3), (7, 4)])
def test_mgda_small_solve_matches_numpy_and_singular_grams_stay_exact(n, seed):
    from bogc_core.integrations.bench.methods.mgda import _solve_ones

    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, n + 3))
    A = G @ G.T  # symmetric positive definite, like a Gram matrix of independent gradients
    np.testing.assert_allclose(_solve_ones(torch.tensor(A)).numpy(),
                               np.linalg.solve(A, np.ones(n)), rtol=1e-9)
    if n >= 3:  # two equal gradients: a singular Gram matrix; the min-norm point still exact
        G[1] = G[0]
        alpha = min_norm(torch.tensor(G @ G.T)).numpy()
        assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
        got = float(np.sum((alpha @ G) ** 2))
        assert got == pytest.approx(_simplex_min_norm(G), rel=1e-7, abs=1e-12)


def test_mgda_is_one_min_norm_over_all_shared_parameters_and_losses():
    model, xs, y = _problem(seed=5, dims={"a": 4, "b": 6, "c": 2})
    ref = _plain_source_grads(model, xs, y)
    params = list(model.parameters())
    shared = [j for j, p in enumerate(params) if any(p is q for q in model.encoder_parameters())]
    G = torch.stack([torch.cat([(ref[s][j] if ref[s][j] is not None else torch.zeros_like(params[j]))
                                .reshape(-1) for j in shared]) for s in model.sources]).double()
    m = build("mgda")
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    d = m.backward(losses, logits, y)
    alpha = torch.tensor([d[f"alpha/{s}"] for s in model.sources], dtype=torch.float64)
    # the weights are the simplex min-norm point of the four losses (brute force)
    assert float(((alpha @ G) ** 2).sum()) == pytest.approx(_simplex_min_norm(G.numpy()), rel=1e-7)
    got = torch.cat([params[j].grad.reshape(-1) for j in shared]).double()
    assert torch.allclose(got, alpha @ G, atol=1e-6)
    for j, p in enumerate(params):  # heads: their own loss's gradient
        if j not in shared:
            own = [ref[s][j] for s in model.sources if ref[s][j] is not None]
            assert len(own) == 1 and torch.allclose(p.grad, own[0], atol=1e-7)


def test_mgda_per_encoder_ablation_uses_the_min_norm_point_per_encoder():
    model, xs, y = _problem()
    ref = _plain_source_grads(model, xs, y)
    m = build("mgda_per_encoder")
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    m.backward(losses, logits, y)
    params = list(model.parameters())
    for i, enc in enumerate(model.encoders):
        idx = [next(t for t, q in enumerate(params) if q is p) for p in enc.parameters()]
        g1 = torch.cat([ref["fusion"][j].reshape(-1) for j in idx])
        g2 = torch.cat([ref[model.modalities[i]][j].reshape(-1) for j in idx])
        a = min_norm_2(g1, g2)
        got = torch.cat([params[j].grad.reshape(-1) for j in idx])
        assert torch.allclose(got, 2 * (a * g1 + (1 - a) * g2), atol=1e-6)
    g = torch.tensor([0.3, -0.2])
    assert min_norm_2(g, g.clone()) == 0.5  # equal gradients: 2 * d is the plain sum


# ---------------------------------------------------------------- MMPareto
def test_mmpareto_agreeing_gradients_scale_the_sum_by_gamma():
    gm = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    gu = [torch.tensor([0.5, 1.0]), torch.tensor([1.0])]
    out, a = mmpareto(gm, gu, gamma=1.5)
    assert a == 0.5
    for o, x, z in zip(out, gm, gu):
        assert torch.allclose(o, 1.5 * (x + z))


def test_mmpareto_conflict_gives_common_direction_with_sum_magnitude():
    gm = [torch.tensor([2.0, 0.0])]
    gu = [torch.tensor([-1.0, 1.0])]
    out, a = mmpareto(gm, gu, gamma=1.5)
    a_ref = min_norm_2(gm[0], gu[0])
    assert a == pytest.approx(a_ref)
    h = 2 * (a_ref * gm[0] + (1 - a_ref) * gu[0])
    r = torch.linalg.vector_norm(gm[0] + gu[0]) / torch.linalg.vector_norm(h)
    expected = 1.5 * (r * h if r > 1 else h)
    assert torch.allclose(out[0], expected)
    # a descent direction for both objectives
    assert torch.dot(out[0], gm[0]) >= -1e-6 and torch.dot(out[0], gu[0]) >= -1e-6


# ---------------------------------------------------------------- OGM-GE
def _ogm_reference(model, xs, y, alpha):
    """Coefficients from the fusion head's per-modality shares, as in the official code."""
    with torch.no_grad():
        feats = [enc(x) for enc, x in zip(model.encoders, xs)]
        W, b = model.fusion_head.weight, model.fusion_head.bias
        s, start = [], 0
        for h in feats:
            o = h @ W[:, start:start + h.shape[1]].T + b / len(feats)
            start += h.shape[1]
            s.append(torch.softmax(o, 1)[torch.arange(len(y)), y].sum().item())
    M = len(s)
    rho = [s[i] / (sum(s[j] for j in range(M) if j != i) / (M - 1)) for i in range(M)]
    return [1 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho]


def _fusion_only_reference(model, xs, y):
    """Brute force: encoders and fusion head from the fusion loss alone (one fresh graph), each
    unimodal head from its loss on detached encoder features (another fresh graph)."""
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    z, _ = model(xs)
    F.cross_entropy(z, y).backward()
    trunk = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    feats = [enc(x).detach() for enc, x in zip(model.encoders, xs)]
    sum(F.cross_entropy(head(h), y) for head, h in zip(model.heads, feats)).backward()
    heads = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    out = []
    for t, h in zip(trunk, heads):
        assert (t is None) != (h is None)  # each tensor is reached by exactly one of the two
        out.append(t if t is not None else h)
    return out


@pytest.mark.parametrize("dims", [{"a": 5, "b": 3}, {"a": 4, "b": 6, "c": 2}])
def test_fusion_only_is_the_fusion_gradient_with_heads_on_detached_features(dims):
    model, xs, y = _problem(seed=7, dims=dims)
    ref = _fusion_only_reference(model, xs, y)
    plain = _plain_source_grads(model, xs, y)
    m = build("fusion_only")
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    assert m.backward(losses, logits, y) == {}
    params = list(model.parameters())
    for j, p in enumerate(params):
        assert torch.allclose(p.grad, ref[j], atol=1e-7)
    enc = {id(q) for q in model.encoder_parameters()}
    for j, p in enumerate(params):
        if id(p) in enc:  # the unimodal losses do reach the encoders in `sum`, and are dropped here
            tot = sum(plain[s][j] for s in model.sources if plain[s][j] is not None)
            assert not torch.allclose(p.grad, tot, atol=1e-6)
            assert torch.allclose(p.grad, plain["fusion"][j], atol=1e-7)


def test_fusion_only_is_a_main_method():
    from bogc_core.integrations.bench.methods import ABLATIONS, MAIN_METHODS

    assert "fusion_only" in MAIN_METHODS and "fusion_only" not in ABLATIONS
    for name in ("pcgrad_per_encoder", "ogm_ge_unimodal", "ogm_ge_dominant_noise", "mgda_per_encoder"):
        assert name in ABLATIONS and name not in MAIN_METHODS


@pytest.mark.parametrize("seed", range(6))
def test_ogm_ge_coefficients_are_the_official_two_modality_rule(seed):
    # the official code: ratio_v = s_v / s_a; if ratio_v > 1 the visual encoder is damped by
    # 1 - tanh(alpha * ratio_v), else the audio one by 1 - tanh(alpha / ratio_v)
    rng = np.random.default_rng(seed)
    s_a, s_v = rng.uniform(1, 60, size=2)
    alpha = [0.1, 0.5, 0.8][seed % 3]
    ratio_v = s_v / s_a
    if ratio_v > 1:
        k_a, k_v = 1.0, 1 - math.tanh(alpha * ratio_v)
    else:
        k_a, k_v = 1 - math.tanh(alpha / ratio_v), 1.0
    got = coefficients(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
    assert got == pytest.approx([k_a, k_v], rel=1e-12)
    assert min(got) < 1.0 and max(got) == 1.0


def test_ogm_ge_window_includes_its_end_epoch():
    # the official default: modulation_starts 0, modulation_ends 50 of 100 epochs, start <= e <= end
    assert [e for e in range(100) if in_window(e, 100, (0.0, 0.5))] == list(range(51))
    assert [e for e in range(20) if in_window(e, 20, (0.0, 0.5))] == list(range(11))
    assert [e for e in range(100) if in_window(e, 100, (0.2, 0.8))] == list(range(20, 81))
    m = OGMGE()
    assert m.alpha == 0.1 and tuple(m.window) == (0.0, 0.5)  # the official README's default setting
    m.start_epoch(50, 100)
    assert m.active
    m.start_epoch(51, 100)
    assert not m.active


@pytest.mark.parametrize("dims", [{"a": 5, "b": 3}, {"a": 4, "b": 6, "c": 2}])
def test_ogm_ge_modulates_the_fusion_gradient_alone_and_is_fusion_only_outside_the_window(dims):
    model, xs, y = _problem(seed=3, dims=dims)
    ref = _fusion_only_reference(model, xs, y)
    k = _ogm_reference(model, xs, y, alpha=0.5)
    assert min(k) < 1 and max(k) == 1.0
    m = OGMGE(alpha=0.5)
    m.setup(model)
    m.start_epoch(5, 10)  # the window's end epoch: inside
    losses, logits = _losses(model, xs, y)
    d = m.backward(losses, logits, y)
    assert [d[f"coef/{s}"] for s in model.modalities] == pytest.approx(k)
    gen = torch.Generator().manual_seed(1)  # the method's noise stream, drawn in the same order
    params = list(model.parameters())
    index = {id(p): j for j, p in enumerate(params)}
    enc = set()
    for i, e in enumerate(model.encoders):
        for p in e.parameters():
            j = index[id(p)]
            enc.add(j)
            gf = ref[j]
            if p.ndim >= 2:  # weights: damped, plus noise with the undamped gradient's std (every encoder)
                noise = torch.randn(p.shape, generator=gen) * (gf.std() + 1e-8)
                assert torch.allclose(p.grad, k[i] * gf + noise, atol=1e-6)
            else:  # biases untouched
                assert torch.allclose(p.grad, gf, atol=1e-7)
    for j, p in enumerate(params):  # fusion head: the fusion gradient; heads: on detached features
        if j not in enc:
            assert torch.allclose(p.grad, ref[j], atol=1e-7)
    m.start_epoch(6, 10)  # outside the window: the fusion-only gradient
    losses, logits = _losses(model, xs, y)
    d = m.backward(losses, logits, y)
    assert all(d[f"coef/{s}"] == 1.0 for s in model.modalities)
    fo = build("fusion_only")
    fo.setup(model)
    got = [p.grad.clone() for p in params]
    losses, logits = _losses(model, xs, y)
    fo.backward(losses, logits, y)
    for j, p in enumerate(params):
        assert torch.allclose(got[j], ref[j], atol=1e-7)
        assert torch.equal(got[j], p.grad)


@pytest.mark.parametrize("dims", [{"a": 5, "b": 3}, {"a": 4, "b": 6, "c": 2}])
def test_ogm_ge_unimodal_ablation_adds_the_unimodal_gradients(dims):
    model, xs, y = _problem(seed=3, dims=dims)
    ref = _plain_source_grads(model, xs, y)
    k = _ogm_reference(model, xs, y, alpha=0.5)
    m = build("ogm_ge_unimodal").with_params(alpha=0.5)
    m.setup(model)
    m.start_epoch(5, 10)  # the window's end epoch: inside
    losses, logits = _losses(model, xs, y)
    m.backward(losses, logits, y)
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for i, enc in enumerate(model.encoders):
        src = model.modalities[i]
        for p in enc.parameters():
            j = next(t for t, q in enumerate(params) if q is p)
            gf, gu = ref["fusion"][j], ref[src][j]
            if p.ndim >= 2:
                noise = torch.randn(p.shape, generator=gen) * (gf.std() + 1e-8)
                assert torch.allclose(p.grad, k[i] * gf + noise + gu, atol=1e-6)
            else:
                assert torch.allclose(p.grad, gf + gu, atol=1e-7)
    m.start_epoch(6, 10)  # outside the window: the plain sum
    losses, logits = _losses(model, xs, y)
    m.backward(losses, logits, y)
    for j, p in enumerate(params):
        tot = sum(ref[s][j] for s in model.sources if ref[s][j] is not None)
        assert torch.allclose(p.grad, tot, atol=1e-6)


def test_ogm_ge_dominant_noise_ablation_damps_only_the_dominant_encoder():
    model, xs, y = _problem(seed=3)
    m = OGMGEDominantNoise(alpha=0.5)
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    ref = _plain_source_grads(model, xs, y)
    with torch.no_grad():
        s = [torch.softmax(u, 1)[torch.arange(len(y)), y].sum().item() for u in logits[1]]
    k = [1 - math.tanh(0.5 * r) if r > 1 else 1.0 for r in (s[0] / s[1], s[1] / s[0])]
    m.backward(losses, logits, y)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for i, enc in enumerate(model.encoders):
        for p in enc.parameters():
            j = next(t for t, q in enumerate(params) if q is p)
            g = k[i] * ref["fusion"][j]
            if k[i] < 1:
                g = g + torch.randn(g.shape, generator=gen) * g.std()
            assert torch.allclose(p.grad, g + ref[model.modalities[i]][j], atol=1e-6)


# ---------------------------------------------------------------- sum / uniform
def test_sum_and_uniform_gradients():
    model, xs, y = _problem(seed=1)
    ref = _plain_source_grads(model, xs, y)
    for name, factor in (("sum", 1.0), ("uniform", 1.0 / 3)):
        m = build(name)
        m.setup(model)
        losses, logits = _losses(model, xs, y)
        m.backward(losses, logits, y)
        for j, p in enumerate(model.parameters()):
            tot = sum(ref[s][j] for s in model.sources if ref[s][j] is not None)
            assert torch.allclose(p.grad, factor * tot, atol=1e-6)


# ---------------------------------------------------------------- inverse variance / BOGC
def test_inverse_variance_config_is_closed_form_6():
    rng = np.random.default_rng(0)
    n = 6
    samples = [rng.normal(loc=rng.normal(size=9), scale=rng.uniform(0.2, 3.0, size=9), size=(n, 9))
               for _ in range(3)]
    stats = [GradientStats.from_samples(s) for s in samples]
    cal = calibrate(stats, INVERSE_VARIANCE)
    m = np.stack([s.mean(0) for s in samples])
    m2 = np.stack([((s - s.mean(0)) ** 2).sum(0) for s in samples])
    tau = n * n / m2  # precision of the mean gradient
    expected = 3 * (tau * m).sum(0) / tau.sum(0)
    np.testing.assert_allclose(np.asarray(cal.gradient), expected, rtol=1e-9)


def test_bogc_with_uniform_weights_and_no_scale_is_the_sum():
    model, xs, y = _problem(seed=2, dims={"a": 4, "b": 6, "c": 2})
    ref = _plain_source_grads(model, xs, y)
    m = BOGC("b", CalibrationConfig(weights="uniform", scale="none"))
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    d = m.backward(losses, logits, y)
    for j, p in enumerate(model.parameters()):
        tot = sum(ref[s][j] for s in model.sources if ref[s][j] is not None)
        assert torch.allclose(p.grad, tot, atol=1e-6)
    assert d["weight/a"] == pytest.approx(0.5)


def test_bogc_normmatched_keeps_bogc_direction_with_the_sum_norm_per_tensor():
    model, xs, y = _problem(seed=6, B=32)
    ref = _plain_source_grads(model, xs, y)
    grads = {}
    for name in ("bogc", "bogc_normmatched"):
        m = build(name)
        m.setup(model)
        losses, logits = _losses(model, xs, y)
        m.backward(losses, logits, y)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for j, (a, b) in enumerate(zip(grads["bogc"], grads["bogc_normmatched"])):
        tot = sum(ref[s][j] for s in model.sources if ref[s][j] is not None)
        assert torch.allclose(b, a * (tot.norm() / a.norm()), rtol=1e-5, atol=1e-7)
        assert b.norm() == pytest.approx(tot.norm().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["bogc", "inverse_variance"])
def test_bogc_methods_set_finite_gradients_and_report_weights(name):
    model, xs, y = _problem(seed=4, B=32)
    m = build(name)
    m.setup(model)
    losses, logits = _losses(model, xs, y)
    d = m.backward(losses, logits, y)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    ws = {k: v for k, v in d.items() if k.startswith("weight/")}
    assert set(ws) == {"weight/fusion", "weight/a", "weight/b"}
    # an encoder's two weights sum to 1 per dimension, so the unimodal mean is 1 - the fusion share
    assert 0 < d["uncertainty"] <= 1
    assert all(0 <= v <= 1 for v in ws.values())
