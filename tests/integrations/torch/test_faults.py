"""Bad inputs and failures: a BOGCError or a correct answer, and nothing changed on an error."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, Laplace, Microbatch, Steps  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import (  # noqa: E402
    batch,
    loop_grads,
    losses_of,
    make,
    reference,
    source,  # noqa: E402
)

from bogc_core import (  # noqa: E402
    BOGCError,
    CalibrationConfig,
    NonFiniteError,
)
from bogc_core.errors import ConfigError, InsufficientSamplesError, ShapeError  # noqa: E402


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps"])
def test_error_changes_no_grad_and_no_state(samples):
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9 if samples == "steps" else None))
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
        GradientCalibrator(m.parameters(), samples=Microbatch(1))
    with pytest.raises(ConfigError, match="rho"):
        GradientCalibrator(m.parameters(), samples=Steps(rho=0.3))
    with pytest.raises(ConfigError, match="params"):
        GradientCalibrator([])
    with pytest.raises(ConfigError, match="Laplace"):
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


# ------------------------------------------------------- injected failures
def _snapshot(m, cal):
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    return grads, buf.getvalue()


def _assert_unchanged(m, cal, snap):
    grads, state = snap
    for n, p in m.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    assert buf.getvalue() == state


def _stages():
    """Every stage of backward, as (label, owner, attribute); the owner is resolved per calibrator."""
    from bogc_core.integrations.torch import calibrator as cal_mod
    from bogc_core.integrations.torch import state as state_mod
    from bogc_core.integrations.torch import workspace as ws_mod

    return [
        ("check_losses", "cal", "_check_losses"),
        ("graph_walk", cal_mod, "walk"),
        ("problem", "cal", "_problem"),
        ("layout", ws_mod.Workspace, "layout"),
        ("sample", "source", "sample"),
        ("after_reduce", "source", "after_reduce"),
        ("state_update", state_mod.StepState, "updated"),
        ("fill", ws_mod.Group, "fill"),
        ("finite_check", ws_mod.Group, "finite_sum"),
        ("plain", ws_mod.Group, "plain"),
        ("fused_call", ws_mod, "calibrate_gradient"),
        ("diagnostics", cal_mod, "group_entries"),
        ("summary", cal_mod, "model_summary"),
        ("write", "cal", "_write"),
        ("state_commit", state_mod.StepState, "commit"),
    ]


STAGE_LABELS = [s[0] for s in _stages()]


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps"])
@pytest.mark.parametrize("stage", STAGE_LABELS)
def test_failure_at_every_stage_changes_nothing(samples, stage, monkeypatch):
    m = make()
    xa, xb, y = batch(8)
    rho = 0.9 if samples == "steps" else 0.5
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=rho), model=m if samples != "steps" else None, diagnostics=Diagnostics(every=1))
    for seed in (1, 2):  # past warm-up, so the fused call and the diagnostics run
        m.zero_grad()
        cal.backward(losses_of(m, *batch(8, seed=seed)))
    snap = _snapshot(m, cal)
    label, owner, attr = next(s for s in _stages() if s[0] == stage)
    target = {"cal": cal, "source": cal.samples}.get(owner, owner) if isinstance(owner, str) else owner

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure at {label}")

    monkeypatch.setattr(target, attr, boom)
    with pytest.raises(RuntimeError, match="injected"):
        cal.backward(losses_of(m, xa, xb, y))
    _assert_unchanged(m, cal, snap)
    monkeypatch.undo()
    # The calibrator still works and gives what an untouched twin gives.
    twin = make()
    twin_cal = GradientCalibrator(twin.named_parameters(), samples=source(samples, rho=rho), model=twin if samples != "steps" else None)
    for seed in (1, 2):
        twin.zero_grad()
        twin_cal.backward(losses_of(twin, *batch(8, seed=seed)))
    cal.backward(losses_of(m, xa, xb, y))
    twin_cal.backward(losses_of(twin, xa, xb, y))
    for (n, p), q in zip(m.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


# ----------------------------------------------------------- raw crashes
class ZeroFeature(nn.Module):
    """A modality with no features (its encoder's weight has zero elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(0, 4)
        self.enc_b = nn.Linear(3, 4)
        self.fusion = nn.Linear(8, 2)
        self.head_a = nn.Linear(4, 2)

    def forward(self, xa, xb):
        za, zb = torch.tanh(self.enc_a(xa)), torch.tanh(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], 1)), self.head_a(za)


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps"])
@pytest.mark.parametrize("use_model", [False, True])
def test_zero_size_parameter_and_zero_feature_modality(samples, use_model):
    torch.manual_seed(0)
    m = ZeroFeature().double()
    g = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(8, 0, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    ce = nn.CrossEntropyLoss(reduction="none")
    cfg = CalibrationConfig(gamma=0.0)  # equal evidence: the plain summed gradient
    cal = GradientCalibrator(m.named_parameters(), cfg, samples=source(samples, rho=0.9 if samples == "steps" else None), model=m if use_model else None)
    f, oa = m(xa, xb)
    diag = cal.backward({"f": ce(f, y), "a": ce(oa, y)})
    assert m.enc_a.weight.grad is None  # no entries, left alone
    f, oa = m(xa, xb)
    want = torch.autograd.grad(ce(f, y).mean() + ce(oa, y).mean(), list(m.parameters()), allow_unused=True)
    for (n, p), w in zip(m.named_parameters(), want):
        if p.numel():
            torch.testing.assert_close(p.grad, w, msg=n)
    assert diag["num_reached"] == 7


def test_steps_with_no_parameter_reached_changes_nothing():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = nn.Parameter(torch.ones(2, dtype=torch.float64))
    cal = GradientCalibrator([("p", p)], samples="steps")
    diag = cal.backward({"a": (q * 2).sum(), "b": (q * 3).sum()})
    assert p.grad is None
    assert diag["num_reached"] == 0 and diag["num_calibrated"] == 0


def test_laplace_head_outside_the_sources_graph_is_a_config_error():
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=Laplace(layers={"fusion": m.fusion, "a": m.head_b, "b": m.head_b}))
    with pytest.raises(ConfigError, match=r"Laplace\(layers=\)\['a'\]"):
        cal.backward(losses_of(m, xa, xb, y))
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps", "laplace"])
def test_backward_after_user_backward_is_a_bogc_error(samples):
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=_samples(m, samples))
    ls = losses_of(m, xa, xb, y)
    sum(l.mean() for l in ls.values()).backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    with pytest.raises(ShapeError, match="already freed"):
        cal.backward(ls)
    for n, p in m.named_parameters():
        if n in before:
            assert torch.equal(p.grad, before[n])


# ---------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_model", [False, True])
def test_low_precision_parameters_accumulate_in_float32(dtype, use_model):
    m64 = make()
    m = make(dtype=dtype)
    xa, xb, y = batch(16)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m if use_model else None, diagnostics=Diagnostics(keep_statistics=True))
    cal.backward(losses_of(m, xa.to(dtype), xb.to(dtype), y))
    for st in (s for per in cal.last_statistics.values() for s in per.values()):
        assert st.mean.dtype == torch.float32 and st.m2.dtype == torch.float32
    # Reference: the same (rounded) weights in float64.
    with torch.no_grad():
        for p64, p in zip(m64.parameters(), m.parameters()):
            p64.copy_(p.double())
    G = loop_grads(m64, xa.to(dtype).double(), xb.to(dtype).double(), y)
    ref = reference(G)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for n, p in m.named_parameters():
        if n.startswith("unused"):
            continue
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), ref[n], rtol=tol * 5, atol=tol, msg=n)


# ------------------------------------------------- probe failures (issue 18)
class SparseEmbed(nn.Module):
    """An embedding shared by two heads; ``sparse`` selects sparse gradients."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse).double()
        self.head_a = nn.Linear(4, 2).double()
        self.head_b = nn.Linear(4, 2).double()

    def forward(self, i):
        z = self.emb(i)
        return self.head_a(z), self.head_b(z)


def _embed_losses(m):
    i = torch.arange(8) % 10
    y = torch.arange(8) % 2
    oa, ob = m(i)
    ce = nn.CrossEntropyLoss(reduction="none")
    return {"a": ce(oa, y), "b": ce(ob, y)}


def _samples(m, samples, **opts):
    """The sample source ``samples`` with ``opts``; Laplace gets ``m``'s heads."""
    if samples != "laplace":
        return source(samples, **opts)
    if isinstance(m, SparseEmbed):
        return source(samples, {"a": m.head_a, "b": m.head_b}, **opts)
    return source(samples, {"fusion": m.fusion, "a": m.head_a, "b": m.head_b}, **opts)


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps", "laplace"])
def test_sparse_embedding_gradients_are_refused(samples):
    """nn.Embedding(sparse=True): refused at construction when model= shows it, else at
    backward before any sampling; p.grad and the carried state are untouched."""
    m = SparseEmbed(sparse=True)
    with pytest.raises(ConfigError, match=r"params: parameter 'emb.weight' .*sparse=False"):
        GradientCalibrator(m.named_parameters(), samples=_samples(m, samples), model=m)
    cal = GradientCalibrator(m.named_parameters(), samples=_samples(m, samples, rho=0.9))
    for p in m.parameters():
        p.grad = None
    snap = _snapshot(m, cal)
    with pytest.raises(ConfigError, match=r"params: parameter 'emb.weight' .*sparse=False"):
        cal.backward(_embed_losses(m))
    _assert_unchanged(m, cal, snap)
    # leaving the embedding out is the remedy: the heads are calibrated as usual
    heads = [(n, p) for n, p in m.named_parameters() if not n.startswith("emb")]
    diag = GradientCalibrator(heads, samples=_samples(m, samples)).backward(_embed_losses(m))
    assert diag["num_reached"] == 4 and m.emb.weight.grad is None
    # the dense twin gives the same head gradients
    d = SparseEmbed(sparse=False)
    GradientCalibrator([(n, p) for n, p in d.named_parameters() if not n.startswith("emb")],
                       samples=_samples(d, samples)).backward(_embed_losses(d))
    for (n, p), q in zip(heads, [p for n, p in d.named_parameters() if not n.startswith("emb")]):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_a_compiled_model_is_refused_at_construction():
    m = make()
    compiled = torch.compile(m)  # nothing is compiled before the first call
    for samples in ("per_example", "microbatch"):
        with pytest.raises(ConfigError, match=r"model: a torch.compile'd module"):
            GradientCalibrator(m.named_parameters(), samples=samples, model=compiled)
    holder = nn.Sequential(compiled)
    with pytest.raises(ConfigError, match=r"model: a torch.compile'd module"):
        GradientCalibrator(m.named_parameters(), model=holder)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("samples", ["per_example", "steps"])
def test_a_compiled_graph_is_refused_before_sampling(backend, samples):
    """inductor's backward cannot be batched (a raw NotImplementedError before); with
    aot_eager it runs but every source 'reaches' every parameter of the compiled region,
    so the answer differs from the uncompiled model's: both are refused, nothing changed."""
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9))
    cal.backward(losses_of(m, xa, xb, y))
    snap = _snapshot(m, cal)
    compiled = torch.compile(m, backend=backend)
    try:
        ls = losses_of(compiled, xa, xb, y)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler for inductor here
        pytest.skip(f"torch.compile(backend={backend!r}) cannot run here: {type(exc).__name__}")
    with pytest.raises(ConfigError, match=r"losses: .*torch.compile'd module.*uncompiled model"):
        cal.backward(ls)
    _assert_unchanged(m, cal, snap)


def test_laplace_source_that_reaches_no_calibrated_parameter_sits_out():
    """As with the other sample sources: a source reaching none of the calibrated
    parameters gives no statistics, and the others are calibrated as without it."""
    m = make()
    xa, xb, y = batch(8)
    cal = GradientCalibrator(list(m.enc_a.named_parameters()), samples=_samples(m, "laplace", seed=3))
    diag = cal.backward(losses_of(m, xa, xb, y))  # "b" does not reach enc_a
    assert set(diag["counts"]) == {"fusion", "a"} and diag["num_calibrated"] == 2
    got = [p.grad.clone() for p in m.enc_a.parameters()]
    m2 = make()
    ls = losses_of(m2, xa, xb, y)
    del ls["b"]
    GradientCalibrator(list(m2.enc_a.named_parameters()),
                       samples=_samples(m2, "laplace", seed=3)).backward(ls)
    for g, p in zip(got, m2.enc_a.parameters()):
        torch.testing.assert_close(g, p.grad)
    for samples in ("per_example", "microbatch", "steps"):
        d = GradientCalibrator(list(m.enc_a.named_parameters()), samples=samples).backward(
            losses_of(m, xa, xb, y))
        assert set(d["counts"]) == {"fusion", "a"}


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "steps", "laplace"])
def test_graph_made_stale_by_an_optimizer_step_is_explained(samples):
    m = make()
    xa, xb, y = batch(8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cal = GradientCalibrator(m.named_parameters(), samples=_samples(m, samples, rho=0.9))
    ls = losses_of(m, xa, xb, y)
    cal.backward(ls)
    opt.step()
    snap = _snapshot(m, cal)
    with pytest.raises(ShapeError, match=r"losses: .*modified in place.*optimizer.step\(\).*again"):
        cal.backward(ls)
    _assert_unchanged(m, cal, snap)


@pytest.mark.parametrize("use_model", [False, True])
@pytest.mark.parametrize("samples", ["per_example", "microbatch"])
def test_model_double_after_a_float32_step_follows_the_parameters(samples, use_model):
    """Buffers follow the parameters' dtype: the second step equals a fresh float64
    calibrator's (the same weights: a float32 init is exact in float64)."""
    xa, xb, y = batch(8)
    m = make(dtype=torch.float32)
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples), model=m if use_model else None, diagnostics=Diagnostics(keep_statistics=True))
    cal.backward(losses_of(m, xa.float(), xb.float(), y))
    m.double()
    cal.backward(losses_of(m, xa, xb, y))
    assert {st.mean.dtype for per in cal.last_statistics.values() for st in per.values()} == {
        torch.float64}
    fresh = make(dtype=torch.float32).double()
    GradientCalibrator(fresh.named_parameters(), samples=samples,
                       model=fresh if use_model else None).backward(losses_of(fresh, xa, xb, y))
    for (n, p), q in zip(m.named_parameters(), fresh.parameters()):
        if q.grad is not None:
            assert p.grad.dtype == torch.float64
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=n)


@pytest.mark.parametrize("samples", ["per_example", "steps"])
def test_carried_statistics_follow_model_double(samples):
    """With rho the carried float32 statistics become float64 and are merged: the step
    is within float32 round-off of a run whose two steps were both in float64."""
    xa, xb, y = batch(8)
    runs = []
    for switch in (True, False):
        m = make(dtype=torch.float32) if switch else make(dtype=torch.float32).double()
        cal = GradientCalibrator(m.named_parameters(), samples=source(samples, rho=0.9))
        cal.backward(losses_of(m, xa.to(next(m.parameters()).dtype), xb.to(next(m.parameters()).dtype), y))
        m.double()
        cal.backward(losses_of(m, xa, xb, y))
        saved = cal.state_dict()["state"]["stats"]
        assert {t["m2"].dtype for per in saved.values() for t in per.values()} == {torch.float64}
        runs.append(m)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------- NaN gradients of finite losses
class _NanBelow(torch.autograd.Function):
    """The identity; its backward hands a NaN to row 0 (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0] = float("nan")
        return g


class _NanEncoder(nn.Module):
    """``TwoModal`` with NaN in the gradient below ``za``: ``enc_a``'s statistics (sources
    ``fusion`` and ``a``, a calibrated group) are NaN, every other one is finite."""

    def __init__(self, dtype=torch.float64) -> None:
        super().__init__()
        self.inner = make(dtype=dtype)

    def forward(self, xa, xb):
        m = self.inner
        za, zb = _NanBelow.apply(m.act(m.enc_a(xa))), m.act(m.enc_b(xb))
        return m.fusion(torch.cat([za, zb], dim=1)), m.head_a(za), m.head_b(zb)


def _nan_losses(m: nn.Module, dtype=torch.float64):
    xa, xb, y = batch(8, dtype=dtype)
    return losses_of(m, xa, xb, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", ["per_example", "microbatch"])
def test_nonfinite_statistics_of_a_calibrated_group_raise_and_write_nothing(samples, dtype, monkeypatch):
    """A NaN in a calibrated group's statistics raises the error that names the parameter,
    and no ``p.grad`` is written. In float32 the calibration call checks them (the compiled
    loops fold the check into their passes; no scan before them); in float64 a scan before
    calibrating does."""
    from bogc_core.integrations.torch import workspace

    scanned, first_call = [], []
    real_sum, real_call = workspace.Group.finite_sum, workspace.calibrate_gradient
    monkeypatch.setattr(workspace.Group, "finite_sum", lambda g: scanned.append(g.sources) or real_sum(g))

    def call(*args, **kwargs):
        first_call.append(len(scanned))
        return real_call(*args, **kwargs)

    monkeypatch.setattr(workspace, "calibrate_gradient", call)
    m = _NanEncoder(dtype)
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples), model=m)
    with pytest.raises(NonFiniteError, match=r"parameter 'inner\.enc_a\.(weight|bias)'"):
        cal.backward(_nan_losses(m, dtype))
    assert all(p.grad is None for p in m.parameters())
    before = scanned[:first_call[0]] if first_call else scanned  # scans before calibrating
    assert any(len(s) > 1 for s in before) == (dtype == torch.float64)


@pytest.mark.parametrize("samples", ["per_example", "microbatch"])
def test_nonfinite_statistics_with_on_nonfinite_plain_take_the_plain_step(samples):
    m = _NanEncoder()
    cal = GradientCalibrator(m.named_parameters(), samples=source(samples), model=m,
                             on_nonfinite="plain")
    ls = _nan_losses(m)
    want = torch.autograd.grad(ls["b"].mean(), m.inner.head_b.weight, retain_graph=True)[0]
    diag = cal.backward(ls)
    assert diag["nonfinite"] and {"inner.enc_a.weight", "inner.enc_a.bias"} <= set(diag["nonfinite_parameters"])
    torch.testing.assert_close(m.inner.head_b.weight.grad, want, rtol=1e-12, atol=0)
    assert not torch.isfinite(m.inner.enc_a.weight.grad).all()


@pytest.mark.parametrize("plain", [False, True])
def test_an_overflowing_calibrated_gradient_raises_or_takes_the_plain_step(plain, monkeypatch):
    """Finite statistics whose calibrated gradient overflows (simulated: the core's output
    check raises after writing infinities): an error naming the parameters, or with
    ``on_nonfinite="plain"`` the plain step; never infinities in ``p.grad`` silently."""
    from bogc_core.integrations.torch import workspace

    real = workspace.calibrate_gradient

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("check_values"):
            out.fill_(float("inf"))
            raise NonFiniteError("stats_per_source: the calibrated gradient overflows the dtype")
        return out

    f32 = torch.float32  # the compiled loops' case, where the calibration call checks its output
    m = make(dtype=f32)
    cal = GradientCalibrator(m.named_parameters(), samples="per_example", model=m,
                             on_nonfinite="plain" if plain else "raise")
    cal.backward(losses_of(m, *batch(8, dtype=f32)))  # past warm-up
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    monkeypatch.setattr(workspace, "calibrate_gradient", overflowing)
    ls = losses_of(m, *batch(8, seed=2, dtype=f32))
    if not plain:
        with pytest.raises(NonFiniteError, match="overflows its dtype"):
            cal.backward(ls)
        for n, p in m.named_parameters():
            if n in before:
                assert torch.equal(p.grad, before[n]), n
        return
    diag = cal.backward(ls)
    assert diag["nonfinite"] and "enc_a.weight" in diag["nonfinite_parameters"]
    assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
