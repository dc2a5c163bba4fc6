"""PCGrad and MGDA of ``bogc bench`` against TorchJD's aggregators on the same joint Jacobian.

The Jacobian has one row per loss (fusion and every unimodal loss) and one
column per shared parameter (every encoder's), built here by independent
backward passes. TorchJD's PCGrad visits the other losses in the order of
``torch.randperm`` on the global generator; the method draws the same
permutations from its own generator, so both are seeded alike before each call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bogc_core.integrations.bench.methods import build
from bogc_core.integrations.bench.methods.pcgrad import pcgrad, pcgrad_weights
from bogc_core.integrations.bench.model import MultiModalNet
from torchjd.aggregation import MGDA as TorchJDMGDA
from torchjd.aggregation import PCGrad as TorchJDPCGrad

REL = 1e-3


def _problem(seed, dims, B=24, conflict=False):
    torch.manual_seed(seed)
    model = MultiModalNet(dims, 4, hidden=8, feat=4)
    xs = [torch.randn(B, d) for d in dims.values()]
    y = torch.randint(0, 4, (B,))
    if conflict:  # every unimodal head scores as the negated fusion-head slice of its modality
        with torch.no_grad():
            W, f = model.fusion_head.weight, model.heads[0].in_features
            for i, head in enumerate(model.heads):
                head.weight.copy_(-W[:, i * f : (i + 1) * f])
                head.bias.zero_()
    return model, xs, y, [y] * len(dims)


def _losses(model, xs, y, y_uni):
    z, zs = model(xs)
    losses = {"fusion": F.cross_entropy(z, y, reduction="none")}
    for m, u, t in zip(model.modalities, zs, y_uni):
        losses[m] = F.cross_entropy(u, t, reduction="none")
    return losses, (z, zs)


def _jacobian(model, xs, y, y_uni):
    """``(S, D)`` rows: each loss's gradient over every encoder parameter (zeros where it does not
    reach), one fresh graph per loss; and each head's own gradient, by parameter index."""
    params = list(model.parameters())
    enc = {id(p) for p in model.encoder_parameters()}
    rows, own = [], {}
    for s in model.sources:
        model.zero_grad(set_to_none=True)
        losses, _ = _losses(model, xs, y, y_uni)
        losses[s].mean().backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                               for p in params if id(p) in enc]))
        for j, p in enumerate(params):
            if id(p) not in enc and p.grad is not None:
                own[j] = p.grad.clone()
    model.zero_grad(set_to_none=True)
    return torch.stack(rows).double(), own


def _run(name, model, xs, y, y_uni, seed=None):
    m = build(name)
    m.setup(model)
    if seed is not None:
        m.gen = torch.Generator().manual_seed(seed)
    losses, logits = _losses(model, xs, y, y_uni)
    d = m.backward(losses, logits, y)
    params = list(model.parameters())
    enc = {id(p) for p in model.encoder_parameters()}
    shared = torch.cat([p.grad.reshape(-1) for p in params if id(p) in enc]).double()
    return shared, {j: p.grad for j, p in enumerate(params) if id(p) not in enc}, d


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


CASES = [(0, {"a": 5, "b": 3}, False), (1, {"a": 5, "b": 3}, True),
         (2, {"a": 4, "b": 6, "c": 2}, False), (3, {"a": 4, "b": 6, "c": 2}, True),
         (4, {"a": 7, "b": 2, "c": 3, "d": 5}, True)]


@pytest.mark.parametrize("seed, dims, conflict", CASES)
def test_pcgrad_equals_torchjd_pcgrad_on_the_joint_shared_jacobian(seed, dims, conflict):
    model, xs, y, y_uni = _problem(seed, dims, conflict=conflict)
    J, own = _jacobian(model, xs, y, y_uni)
    G = J @ J.T
    if conflict:  # the case the per-encoder form got wrong: some pair of losses conflicts
        assert (G < 0).any()
    for order_seed in (11, 12, 13):
        got, heads, d = _run("pcgrad", model, xs, y, y_uni, seed=order_seed)
        torch.manual_seed(order_seed)
        ref = TorchJDPCGrad()(J)
        assert _rel(got, ref) < REL
        assert [d[f"pcgrad_w/{s}"] for s in model.sources] == pytest.approx(
            pcgrad_weights(G, torch.Generator().manual_seed(order_seed)).tolist())
    for j, g in heads.items():  # task-specific parameters: their own loss's gradient
        assert torch.allclose(g, own[j], atol=1e-7)
    if conflict:  # the surgery acted: the update is not the plain sum of the rows
        assert _rel(got, J.sum(0)) > 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_aggregator_equals_torchjd_on_random_and_conflicting_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    S, D = 3 + seed, 20
    J = torch.randn(S, D, generator=g, dtype=torch.float64)
    Jc = J.clone()
    Jc[1] = -0.8 * Jc[0] + 0.3 * Jc[1]  # a strongly conflicting pair
    for M in (J, Jc):
        torch.manual_seed(100 + seed)
        ref = TorchJDPCGrad()(M)
        got = pcgrad(list(M), torch.Generator().manual_seed(100 + seed))
        assert _rel(got, ref) < 1e-12


def test_pcgrad_per_encoder_ablation_applies_the_surgery_per_encoder():
    model, xs, y, y_uni = _problem(5, {"a": 5, "b": 3}, conflict=True)
    params = list(model.parameters())
    ref = {}
    for s in model.sources:
        model.zero_grad(set_to_none=True)
        losses, _ = _losses(model, xs, y, y_uni)
        losses[s].mean().backward()
        ref[s] = [None if p.grad is None else p.grad.clone() for p in params]
    m = build("pcgrad_per_encoder")
    m.setup(model)
    losses, logits = _losses(model, xs, y, y_uni)
    m.backward(losses, logits, y)
    for i, enc in enumerate(model.encoders):
        idx = [next(t for t, q in enumerate(params) if q is p) for p in enc.parameters()]
        g1 = torch.cat([ref["fusion"][j].reshape(-1) for j in idx])
        g2 = torch.cat([ref[model.modalities[i]][j].reshape(-1) for j in idx])
        dot = torch.dot(g1, g2)
        # two gradients, closed form: each projected off the other where they conflict
        want = g1 + g2 if dot >= 0 else g1 - dot / g2.dot(g2) * g2 + g2 - dot / g1.dot(g1) * g1
        got = torch.cat([params[j].grad.reshape(-1) for j in idx])
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("seed, dims, conflict", CASES)
def test_mgda_equals_torchjd_mgda_on_the_joint_shared_jacobian(seed, dims, conflict):
    model, xs, y, y_uni = _problem(seed, dims, conflict=conflict)
    J, own = _jacobian(model, xs, y, y_uni)
    got, heads, d = _run("mgda", model, xs, y, y_uni)
    # TorchJD's default (epsilon 1e-3, 100 steps) stops early; run its Frank-Wolfe to convergence
    ref = TorchJDMGDA(epsilon=1e-14, max_iters=200_000)(J)
    assert _rel(got, ref) < REL
    for j, g in heads.items():
        assert torch.allclose(g, own[j], atol=1e-7)
