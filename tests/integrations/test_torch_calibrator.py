"""GradientCalibrator against an independent computation.

The reference takes per-example gradients one example at a time (a plain
loop of single-example forward and backward passes), forms the samples of
each sample source from them, feeds ``GradientStats.from_samples`` and
``bogc_core.calibrate``, and must reproduce ``p.grad``.
"""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from bogc_core.integrations.torch.shortcut import per_example_sums  # noqa: E402
from torch import nn  # noqa: E402

from bogc_core import (  # noqa: E402
    BOGCError,
    CalibrationConfig,
    GradientStats,
    NonFiniteError,
    calibrate,
    calibrate_tensors,
)
from bogc_core.errors import ConfigError, InsufficientSamplesError, ShapeError  # noqa: E402

SOURCES = ("fusion", "a", "b")


class TwoModal(nn.Module):
    """Two encoders, a fusion head and one head per modality, plus a layer no loss uses."""

    def __init__(self, inplace_relu: bool = False) -> None:
        super().__init__()
        self.enc_a = nn.Linear(5, 6)
        self.enc_b = nn.Linear(4, 6)
        self.fusion = nn.Linear(12, 3)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)
        self.act = nn.ReLU(inplace=True) if inplace_relu else nn.Tanh()

    def forward(self, xa, xb):
        za, zb = self.act(self.enc_a(xa)), self.act(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], dim=1)), self.head_a(za), self.head_b(zb)


def make(seed: int = 0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TwoModal(**kw).to(dtype)


def batch(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, 5, generator=g, dtype=dtype)
    xb = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return xa, xb, y


def losses_of(model, xa, xb, y):
    ce = nn.CrossEntropyLoss(reduction="none")
    f, oa, ob = model(xa, xb)
    return {"fusion": ce(f, y), "a": ce(oa, y), "b": ce(ob, y)}


def loop_grads(model, xa, xb, y):
    """{source: {param name: (B, *shape)}} of per-example gradients, one example at a time."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    out = {s: {} for s in SOURCES}
    for i in range(xa.shape[0]):
        ls = losses_of(model, xa[i:i + 1], xb[i:i + 1], y[i:i + 1])
        for s in SOURCES:
            gs = torch.autograd.grad(ls[s][0], params, allow_unused=True, retain_graph=True)
            for n, g in zip(names, gs):
                if g is not None:
                    out[s].setdefault(n, []).append(g)
    return {s: {n: torch.stack(v) for n, v in d.items()} for s, d in out.items()}


def reference(samples_by_source, config=None, lam=None):
    """{param: expected grad} from {source: {param: samples (n, *shape)}}."""
    per_param: dict[str, dict[str, GradientStats]] = {}
    for s, d in samples_by_source.items():
        for n, x in d.items():
            per_param.setdefault(n, {})[s] = GradientStats.from_samples(x)
    return stats_reference(per_param, config, lam)


def stats_reference(per_param, config=None, lam=None):
    out = {}
    for n, srcs in per_param.items():
        if len(srcs) == 1:
            (s, st), = srcs.items()
            out[n] = st.mean * (1.0 if lam is None else lam[s])
        else:
            w = None if lam is None else {k: lam[k] for k in srcs}
            out[n] = calibrate(srcs, config, w).gradient
    return out


def assert_grads(model, expected, rtol=1e-8, atol=1e-12):
    for n, p in model.named_parameters():
        if n.startswith("unused"):
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], rtol=rtol, atol=atol, msg=n)


def chunk_means(g, chunks):
    return torch.stack([c.mean(dim=0) for c in torch.tensor_split(g, chunks)])


# ---------------------------------------------------------------- exactness
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
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", chunk_bytes=2 * 8 * 120)
    cal.backward(losses_of(m, xa, xb, y))
    assert_grads(m, reference(loop_grads(m, xa, xb, y)))


@pytest.mark.parametrize("use_model", [False, True], ids=["generic", "linear_shortcut"])
def test_microbatch_matches_loop(use_model):
    m = make()
    xa, xb, y = batch(12)
    cal = GradientCalibrator(m.named_parameters(), samples="microbatch", chunks=4,
                             model=m if use_model else None)
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    ref = reference({s: {n: chunk_means(g, 4) for n, g in d.items()} for s, d in G.items()})
    assert_grads(m, ref)


def test_microbatch_unequal_chunks_are_weighted():
    # 10 examples in 4 chunks (3, 3, 2, 2): weights f_j = n_j * c / B keep the
    # mean equal to the full-batch gradient.
    m = make()
    xa, xb, y = batch(10)
    cal = GradientCalibrator(m.named_parameters(), samples="microbatch", chunks=4, model=m)
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


def test_steps_match_loop_with_forgetting():
    m = make()
    rho = 0.8
    cal = GradientCalibrator(m.named_parameters(), samples="steps", rho=rho)
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
    cal = GradientCalibrator(m.named_parameters(), samples="steps", rho=0.9)
    for step in range(4):
        xa, xb, y = batch(6, seed=step)
        ls = {k: v.mean() for k, v in losses_of(m, xa, xb, y).items()}
        cal.backward(ls)
    G = loop_grads(m, xa, xb, y)
    torch.testing.assert_close(m.head_a.weight.grad, G["a"]["head_a.weight"].mean(0))


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
        cal = GradientCalibrator(m.named_parameters(), CalibrationConfig(gamma=0.0),
                                 samples=samples, chunks=3, rho=1.0, model=m)
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
    assert math.isclose(sum(diag["weight_mean"].values()), 1.0, rel_tol=1e-6)
    assert set(diag["weight_mean"]) == set(SOURCES)


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
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m,
                             keep_statistics=True)
    cal.backward(losses_of(m, xa, xb, y))
    G = loop_grads(m, xa, xb, y)
    for s in SOURCES:
        for n, st in cal.last_statistics[s].items():
            g = G[s][n]
            torch.testing.assert_close(st.mean, g.mean(0))
            torch.testing.assert_close(st.m2, ((g - g.mean(0)) ** 2).sum(0), rtol=1e-7, atol=1e-12)
            assert float(st.count) == 9.0


# ------------------------------------------------------------ atomicity
@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps"])
def test_error_changes_no_grad_and_no_state(samples):
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=samples, rho=0.9 if samples == "steps" else None)
    cal.backward(losses_of(m, xa, xb, y))
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    state = cal.state_dict()
    ls = losses_of(m, xa, xb, y)
    ls["b"] = ls["b"] * torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="losses\\['b'\\]"):
        cal.backward(ls)
    for n, p in m.named_parameters():
        if n in before:
            assert torch.equal(p.grad, before[n]), n
    after = cal.state_dict()
    if samples == "steps":
        for s, per in state["state"]["stats"].items():
            for n, t in per.items():
                assert torch.equal(after["state"]["stats"][s][n]["m2"], t["m2"])
        assert after["state"]["steps"] == state["state"]["steps"]


def test_insufficient_examples_raise_and_change_nothing():
    m = make()
    xa, xb, y = batch(1)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(InsufficientSamplesError, match="losses"):
        GradientCalibrator(m.named_parameters(), samples="per_example").backward(losses_of(m, xa, xb, y))
    assert all(bool((p.grad == 1).all()) for p in m.parameters())


def test_losses_are_not_mutated():
    m = make()
    xa, xb, y = batch(8)
    ls = losses_of(m, xa, xb, y)
    copies = {k: v.detach().clone() for k, v in ls.items()}
    GradientCalibrator(m.named_parameters(), samples="per_example", model=m).backward(ls)
    for k in ls:
        assert torch.equal(ls[k].detach(), copies[k])


# --------------------------------------------------------------- bad input
def test_bad_input_raises_bogc_errors():
    m = make()
    xa, xb, y = batch(8)
    with pytest.raises(ConfigError, match="samples"):
        GradientCalibrator(m.parameters(), samples="bogus")
    with pytest.raises(ConfigError, match="chunks"):
        GradientCalibrator(m.parameters(), chunks=1)
    with pytest.raises(ConfigError, match="rho"):
        GradientCalibrator(m.parameters(), samples="steps", rho=0.3)
    with pytest.raises(ConfigError, match="params"):
        GradientCalibrator([])
    with pytest.raises(ConfigError, match="laplace_layers"):
        GradientCalibrator(m.parameters(), samples="laplace")
    cal = GradientCalibrator(m.parameters())
    with pytest.raises(ShapeError, match="losses"):
        cal.backward({})
    ls = losses_of(m, xa, xb, y)
    with pytest.raises(ShapeError, match="per-example"):
        cal.backward({"a": ls["a"].mean(), "b": ls["b"]})
    with pytest.raises(ShapeError, match="require grad"):
        cal.backward({"a": ls["a"].detach()})
    cal = GradientCalibrator(m.parameters(), source_weights={"a": 1.0})
    with pytest.raises(ConfigError, match="source_weights"):
        cal.backward(losses_of(m, xa, xb, y))
    assert issubclass(ConfigError, BOGCError)


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
@pytest.mark.parametrize("samples", ["steps", "microbatch"])
def test_resume_is_bit_identical(samples):
    def run(split):
        m = make(dtype=torch.float32)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        mk = lambda: GradientCalibrator(m.named_parameters(), samples=samples, rho=0.9, model=m)  # noqa: E731
        cal = mk()
        grads = []
        for step in range(6):
            if step == split:
                buf = io.BytesIO()
                torch.save({"cal": cal.state_dict(), "opt": opt.state_dict(), "model": m.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf)
                m.load_state_dict(ck["model"])
                cal = mk()
                cal.load_state_dict(ck["cal"])
                opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                opt.load_state_dict(ck["opt"])
            xa, xb, y = batch(8, seed=step, dtype=torch.float32)
            opt.zero_grad()
            cal.backward(losses_of(m, xa, xb, y))
            opt.step()
            grads.append(torch.cat([p.grad.reshape(-1) for n, p in m.named_parameters() if p.grad is not None]))
        return grads, [p.detach().clone() for p in m.parameters()]

    g1, p1 = run(split=-1)
    g2, p2 = run(split=3)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_model():
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples="steps")
    cal.backward(losses_of(m, xa, xb, y))
    other = GradientCalibrator([("w", nn.Parameter(torch.zeros(2)))], samples="steps")
    with pytest.raises(ConfigError, match="state_dict"):
        other.load_state_dict(cal.state_dict())
    with pytest.raises(ConfigError, match="samples"):
        GradientCalibrator(m.named_parameters()).load_state_dict(cal.state_dict())


# ------------------------------------------------ optimizers, clipping, AMP
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
        cal = GradientCalibrator(params, samples=samples, chunks=4)
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


@pytest.mark.parametrize("samples,use_model", [("per_example", True), ("microbatch", True),
                                               ("microbatch", False), ("steps", False)])
def test_all_sources_share_one_backward(samples, use_model, monkeypatch):
    # Every parameter of TwoModal is a Linear weight or bias: with the shortcut all
    # sources' statistics come from ONE batched autograd call; without it, the
    # micro-batch rows of all sources fit one call too.
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=samples, rho=0.9 if samples == "steps" else None,
                             model=m if use_model else None)
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    cal.backward(losses_of(m, xa, xb, y))
    assert len(calls) == 1
    assert calls == [True]


class ConvTwoModal(nn.Module):
    """An image modality through Conv2d layers and a vector modality through Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), dilation=(1, 2), bias=False)
        self.enc_v = nn.Linear(5, 6)
        self.head_i = nn.Linear(4 * 3 * 1, 3)
        self.head_v = nn.Linear(6, 3)
        self.fusion = nn.Linear(12 + 6, 3)

    def forward(self, img, vec):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(img)))).flatten(1)  # (N, 4*3*1)
        z = torch.tanh(self.enc_v(vec))
        return self.fusion(torch.cat([h, z], 1)), self.head_i(h), self.head_v(z)


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
    cal = GradientCalibrator(m.named_parameters(), samples=samples, chunks=3, model=m, chunk_bytes=300)
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
