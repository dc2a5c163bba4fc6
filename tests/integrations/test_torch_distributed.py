"""GradientCalibrator under torch.distributed (gloo, 2 processes on this machine).

Each rank sees half of the batch; the statistics are all-reduced, so both
ranks must write the same ``p.grad`` as one process that saw the whole batch
(bit-identical across ranks, equal to the single process up to rounding).
A rank that dies must surface as a clear error on its peer, not a hang.
Ranks that disagree (source names, parameters reached, dtypes, step
counters, a local failure) must all raise the same ``DistributedError``, and
a source with an empty loss on one rank sits the step out on every rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

if __name__ == "__main__":  # a rank started by run_ranks: tests/ holds distlaunch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from bogc_core.integrations.torch import DistributedError, GradientCalibrator  # noqa: E402
from distlaunch import end_rank, init_rank, run_ranks  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import source  # noqa: E402

from bogc_core import BOGCError  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo"
)

B = 12  # global batch; each of the 2 ranks takes 6 examples


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(5, 6)
        self.enc_b = nn.Linear(4, 6)
        self.fusion = nn.Linear(12, 3)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 3)

    def forward(self, xa, xb):
        za, zb = torch.tanh(self.enc_a(xa)), torch.tanh(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], 1)), self.head_a(za), self.head_b(zb)


def data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randn(B, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def losses(m, xa, xb, y):
    ce = nn.CrossEntropyLoss(reduction="none")
    f, a, b = m(xa, xb)
    return {"fusion": ce(f, y), "a": ce(a, y), "b": ce(b, y)}


CASES = {
    # name: (constructor kwargs per rank, kwargs of the equivalent single process)
    "per_example": (dict(samples="per_example", model=True), dict(samples="per_example", model=True)),
    # Two micro-batches on each rank = four micro-batches of the global batch.
    "microbatch": (dict(samples="microbatch", chunks=2), dict(samples="microbatch", chunks=4)),
    "microbatch_shortcut": (dict(samples="microbatch", chunks=2, model=True),
                            dict(samples="microbatch", chunks=4, model=True)),
    "steps": (dict(samples="steps", rho=0.9), dict(samples="steps", rho=0.9)),
    "laplace": (dict(samples="laplace", draws=4), dict(samples="laplace", draws=4)),
}


def run_case(kwargs, rank: int | None, steps: int = 3):
    """p.grad after ``steps`` steps; rank None = one process on the whole batch."""
    torch.manual_seed(0)
    m = Net().double()
    kw = dict(kwargs)
    if kw.pop("model", False):
        kw["model"] = m
    layers = ({"fusion": m.fusion, "a": m.head_a, "b": m.head_b}
              if kw["samples"] == "laplace" else None)
    opts = {k: kw.pop(k) for k in ("chunks", "rho", "draws") if k in kw}
    kw["samples"] = source(kw["samples"], layers, **opts)
    cal = GradientCalibrator(m.named_parameters(), **kw)
    out = []
    for step in range(steps):
        xa, xb, y = data(step)
        if rank is not None:
            sl = slice(rank * B // 2, (rank + 1) * B // 2)
            xa, xb, y = xa[sl], xb[sl], y[sl]
        cal.backward(losses(m, xa, xb, y))
        out.append({n: p.grad.clone() for n, p in m.named_parameters()})
    return out


# ------------------------------------------------- the verdict, in one process
def _view(**kw):
    from bogc_core.integrations.torch.distributed import LocalView

    v = LocalView(step=3, names=["a", "b"], empty=[],
                  reach={"a": ["w", "u"], "b": ["w"]},
                  tensors={"loss a": "torch.float64", "loss b": "torch.float64",
                           "w": "torch.float64 (2, 3)", "u": "torch.float64 (3,)"},
                  options="samples=per_example")
    for k, x in kw.items():
        setattr(v, k, x)
    return v


def test_verdict_agreeing_ranks_go_on_with_every_source():
    from bogc_core.integrations.torch.distributed import FINGERPRINT, verdict

    views = [_view(), _view()]
    assert verdict([v.__dict__ for v in views]) == (None, set())
    fp = views[0].fingerprint()
    assert len(fp) == FINGERPRINT and fp == views[1].fingerprint()
    assert all(0 <= x < 2**63 for x in fp)
    # the order in which a rank lists its sources or parameters does not matter
    other = _view(names=["b", "a"], reach={"b": ["w"], "a": ["u", "w"]})
    assert other.fingerprint() == fp


@pytest.mark.parametrize("field,value,words", [
    ("step", 4, "step counters differ (rank 0: 3; rank 1: 4)"),
    ("options", "samples=microbatch", "calibrator options differ"),
    ("names", ["a", "c"], "not on every rank: {0: ['b'], 1: ['c']}"),
    ("reach", {"a": ["w"], "b": ["w"]}, "source 'a' reaches different parameters (compared with "
                                        "rank 0: rank 1: only [], missing ['u'])"),
    ("tensors", {"loss a": "torch.float32", "loss b": "torch.float64",
                 "w": "torch.float64 (2, 3)", "u": "torch.float64 (3,)"},
     "loss a: rank 0 torch.float64, rank 1 torch.float32"),
    ("tensors", {"loss a": "torch.float64", "loss b": "torch.float64",
                 "w": "torch.float64 (3, 2)", "u": "torch.float64 (3,)"},
     "w: rank 0 torch.float64 (2, 3), rank 1 torch.float64 (3, 2)"),
    ("error", "ShapeError: losses['a']: bad", "rank 1 failed before the collective (ShapeError"),
])
def test_verdict_names_what_differs(field, value, words):
    from bogc_core.integrations.torch.distributed import verdict

    a, b = _view(), _view(**{field: value})
    assert a.fingerprint() != b.fingerprint()
    msg, _ = verdict([a.__dict__, b.__dict__])
    assert msg is not None and words in msg, msg
    assert verdict([a.__dict__, b.__dict__]) == verdict([a.__dict__, b.__dict__])  # pure


def test_verdict_empty_loss_sits_out_on_every_rank():
    from bogc_core.integrations.torch.distributed import verdict

    # rank 1 has no examples of "b": b sits out everywhere, and what only b
    # used (and its loss dtype) may differ
    a = _view()
    b = _view(empty=["b"], reach={"a": ["w", "u"]},
              tensors={"loss a": "torch.float64", "w": "torch.float64 (2, 3)",
                       "u": "torch.float64 (3,)"})
    assert verdict([a.__dict__, b.__dict__]) == (None, {"b"})
    # every source empty somewhere: nothing left, every rank raises
    c = _view(empty=["a"], reach={"b": ["w"]})
    msg, out = verdict([c.__dict__, b.__dict__])
    assert out == {"a", "b"} and "every source has an empty loss on some rank" in msg
    # a kept source that reaches different parameters still raises
    d = _view(empty=["b"], reach={"a": ["w"]})
    msg, _ = verdict([a.__dict__, d.__dict__])
    assert msg is not None and "source 'a' reaches different parameters" in msg


def test_keys_change_with_reach_dtype_and_shape():
    from bogc_core.integrations.torch.distributed import Agreement

    w, u = torch.zeros(2, 3), torch.zeros(3)
    la, lb = torch.zeros(4), torch.zeros(4)
    base = Agreement().keys(["a", "b"], [{0, 1}, {0}], [la, lb], [w, u])
    # the order of sources and of parameter indices does not matter; a warm cache neither
    ag = Agreement()
    ag.keys(["a", "b"], [{0, 1}, {0}], [la, lb], [w, u])
    assert ag.keys(["b", "a"], [[0], [1, 0]], [lb, la], [w, u]) == base
    other_reach = Agreement().keys(["a", "b"], [{0}, {0, 1}], [la, lb], [w, u])
    other_loss = Agreement().keys(["a", "b"], [{0, 1}, {0}], [la.double(), lb], [w, u])
    other_shape = Agreement().keys(["a", "b"], [{0, 1}, {0}], [la, lb], [torch.zeros(3, 2), u])
    other_dtype = Agreement().keys(["a", "b"], [{0, 1}, {0}], [la, lb], [w, u.double()])
    assert other_reach[0] != base[0] and other_reach[1] == base[1]
    assert other_loss[0] == base[0] and other_loss[1] != base[1]
    assert other_shape[1] != base[1] and other_dtype[1] != base[1]


def test_single_process_needs_no_group():
    from bogc_core.integrations.torch.distributed import active_group

    if not dist.is_initialized():
        assert active_group(None) is None
    sentinel = object()
    assert active_group(sentinel) is sentinel


def _grads(m: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all((a[n] is None and b[n] is None)
               or (a[n] is not None and b[n] is not None and torch.equal(a[n], b[n])) for n in a)


def _attempt(cal: GradientCalibrator, m: nn.Module, make) -> dict:
    before = _grads(m)
    try:
        d = cal.backward(make())
        res = {"outcome": "ok", "sources": d["sources"]}
    except Exception as exc:  # every outcome is recorded and checked by the test
        res = {"outcome": type(exc).__name__, "message": str(exc),
               "is_bogc": isinstance(exc, BOGCError)}
    res["unchanged"] = _same(before, _grads(m))
    return res


def _half(rank: int):
    xa, xb, y = data(0)
    sl = slice(rank * B // 2, (rank + 1) * B // 2)
    return xa[sl], xb[sl], y[sl]


def _agree_worker(rank: int, world: int, out: Path) -> None:
    """Every kind of disagreement in turn, in one process group (which must stay usable)."""
    torch.manual_seed(0)
    m = Net().double()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example")
    xa, xb, y = _half(rank)

    def base():
        return losses(m, xa, xb, y)

    def renamed():  # rank 1 calls source "b" "c"
        d = base()
        if rank == 1:
            d["c"] = d.pop("b")
        return d

    def rewired():  # rank 1's "a" and "b" come from the other head
        d = base()
        if rank == 1:
            d["a"], d["b"] = d["b"], d["a"]
        return d

    def float32():
        d = base()
        if rank == 1:
            d["a"] = d["a"].float()
        return d

    def bad_shape():  # fails rank 1's own input check
        d = base()
        if rank == 1:
            d["a"] = d["a"].unsqueeze(1)
        return d

    def one_example():  # fails while sampling on rank 1 (per-example needs 2 examples)
        return losses(m, xa[:1], xb[:1], y[:1]) if rank == 1 else base()

    def empty_b():
        d = base()
        if rank == 1:
            d["b"] = d["b"][:0]
        return d

    def all_empty():
        d = base()
        return {k: v[:0] for k, v in d.items()} if rank == 1 else d

    res = {}
    res["names"] = _attempt(cal, m, renamed)
    res["reach"] = _attempt(cal, m, rewired)
    res["dtype"] = _attempt(cal, m, float32)
    res["local_error"] = _attempt(cal, m, bad_shape)
    res["sample_error"] = _attempt(cal, m, one_example)
    res["all_empty"] = _attempt(cal, m, all_empty)
    res["empty_b"] = _attempt(cal, m, empty_b)
    torch.save(_grads(m), out / f"empty_b{rank}.pt")
    res["after"] = _attempt(cal, m, base)
    torch.save(_grads(m), out / f"after{rank}.pt")
    # last: rank 1 switches to a calibrator that missed the earlier steps
    fresh = GradientCalibrator(m.named_parameters(), samples="per_example")
    res["step"] = _attempt(fresh if rank == 1 else cal, m, base)
    (out / f"agree{rank}.json").write_text(json.dumps(res))
    end_rank()


def _equal_worker(rank: int, world: int, out: Path) -> None:
    res = {name: run_case(kw, rank) for name, (kw, _) in CASES.items()}
    torch.save(res, out / f"rank{rank}.pt")
    end_rank()


def _stalled_peer_worker(rank: int, world: int, out: Path) -> None:
    """Rank 1 stays alive but never calls backward: rank 0 gives up after the group's 5 s."""
    dist.barrier()
    if rank == 1:
        time.sleep(10)
        os._exit(0)
    torch.manual_seed(0)
    m = Net().double()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example")
    t0 = time.monotonic()
    try:
        cal.backward(losses(m, *_half(rank)))
        msg = "no error"
    except Exception as exc:  # checked by the test
        msg = f"{type(exc).__name__}: {exc}"
    (out / "dead.txt").write_text(f"{time.monotonic() - t0:.3f}\n{all(p.grad is None for p in m.parameters())}\n{msg}")
    os._exit(0)


def _dead_peer_worker(rank: int, world: int, out: Path, mid_step: bool = False) -> None:
    # both ranks must finish connecting before one dies, or rank 0's own
    # init_process_group fails instead of the calibrator's collective
    dist.barrier()
    torch.manual_seed(0)
    m = Net().double()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example")
    if rank == 1:
        if not mid_step:
            os._exit(0)  # dies before the first collective
        # dies after the agreement check, while taking its samples
        cal.samples.sample = lambda prob, ctx: os._exit(0)  # type: ignore[method-assign]
        cal.backward(losses(m, *_half(rank)))
    xa, xb, y = data(0)
    t0 = time.monotonic()
    try:
        cal.backward(losses(m, xa, xb, y))
        msg = "no error"
    except DistributedError as exc:
        msg = "DistributedError: " + str(exc)
    except Exception as exc:  # pragma: no cover - reported by the assertion below
        msg = f"{type(exc).__name__}: {exc}"
    unchanged = all(p.grad is None for p in m.parameters())
    (out / "dead.txt").write_text(f"{time.monotonic() - t0:.3f}\n{unchanged}\n{msg}")
    os._exit(0)  # skip destroy_process_group, which would wait for the dead peer


WORKERS = {"equal": _equal_worker, "agree": _agree_worker, "dead": _dead_peer_worker,
           "dead_mid": lambda r, w, o: _dead_peer_worker(r, w, o, mid_step=True),
           "dead_stalled": _stalled_peer_worker}


def _ranks_ok(scenario: str, out: Path) -> None:
    runs = run_ranks(__file__, scenario, out)
    for r, (rc, text) in enumerate(runs):
        assert rc == 0, f"rank {r} exited with {rc}:\n{text[-3000:]}"


@pytest.mark.slow
def test_two_ranks_equal_single_process_on_global_batch(tmp_path):
    _ranks_ok("equal", tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for name, (_, single_kw) in CASES.items():
        single = run_case(single_kw, None)
        for step, (g0, g1, gs) in enumerate(zip(r0[name], r1[name], single)):
            for n in gs:
                assert torch.equal(g0[n], g1[n]), (name, step, n)
                torch.testing.assert_close(g0[n], gs[n], rtol=1e-7, atol=1e-10,
                                           msg=f"{name} step {step} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["dead", "dead_mid", "dead_stalled"])
def test_dead_peer_raises_clear_error(tmp_path, scenario):
    t0 = time.monotonic()
    runs = run_ranks(__file__, scenario, tmp_path, timeout=60)
    assert runs[0][0] == 0, runs[0][1][-3000:]
    elapsed, unchanged, msg = (tmp_path / "dead.txt").read_text().split("\n", 2)
    assert msg.startswith("DistributedError"), msg
    assert "rank 0 of 2" in msg and "peer" in msg
    assert unchanged == "True"
    # the group's timeout is 5 s; a dead peer is seen at once, a stalled one at the timeout
    assert (4.5 if scenario == "dead_stalled" else 0.0) <= float(elapsed) < 15
    assert time.monotonic() - t0 < 60


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    out = tmp_path_factory.mktemp("agree")
    _ranks_ok("agree", out)
    res = [json.loads((out / f"agree{r}.json").read_text()) for r in range(2)]
    return out, res


DISAGREEMENTS = {
    # case: words the common message must contain
    "names": ["source names differ", "'b'", "'c'", "same source names"],
    "reach": ["reaches different parameters", "head_a", "head_b", "same model code"],
    "dtype": ["dtypes or shapes differ", "loss a", "torch.float32", "same dtype"],
    "local_error": ["rank 1 failed before the collective", "ShapeError", "losses['a']"],
    "sample_error": ["taking the gradient samples failed on rank(s) [1]", "no p.grad changed"],
    "all_empty": ["every source has an empty loss on some rank"],
    "step": ["step counters differ", "once per step"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DISAGREEMENTS))
def test_disagreement_raises_the_same_error_on_every_rank(agreement, case):
    _, res = agreement
    r0, r1 = res[0][case], res[1][case]
    for r in (r0, r1):
        assert r["outcome"] == "DistributedError", r
        assert r["is_bogc"] and r["unchanged"], r
    if case != "sample_error":  # there rank 1 also names its own local exception
        assert r0["message"] == r1["message"]
    for words in DISAGREEMENTS[case]:
        assert words in r0["message"], (words, r0["message"])
        assert words in r1["message"], (words, r1["message"])


def _single(sources: list[str]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = Net().double()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example")
    xa, xb, y = data(0)
    cal.backward({k: v for k, v in losses(m, xa, xb, y).items() if k in sources})
    return _grads(m)


@pytest.mark.slow
def test_empty_loss_on_one_rank_sits_out_on_every_rank(agreement):
    out, res = agreement
    for r in range(2):
        assert res[r]["empty_b"]["outcome"] == "ok", res[r]["empty_b"]
        assert res[r]["empty_b"]["sources"] == ["fusion", "a"]
    g0, g1 = (torch.load(out / f"empty_b{r}.pt") for r in range(2))
    single = _single(["fusion", "a"])
    assert _same(g0, g1)
    # head_b is reached by "b" only: it sat out, so its gradient is left as it was (None)
    assert single["head_b.weight"] is None and g0["head_b.weight"] is None
    for n, g in single.items():
        if g is not None:
            torch.testing.assert_close(g0[n], g, rtol=1e-7, atol=1e-10, msg=n)


@pytest.mark.slow
def test_group_usable_after_every_disagreement(agreement):
    out, res = agreement
    assert [res[r]["after"]["outcome"] for r in range(2)] == ["ok", "ok"]
    g0, g1 = (torch.load(out / f"after{r}.pt") for r in range(2))
    single = _single(["fusion", "a", "b"])
    for n, g in single.items():
        assert torch.equal(g0[n], g1[n]), n
        torch.testing.assert_close(g0[n], g, rtol=1e-7, atol=1e-10, msg=n)


if __name__ == "__main__":
    _scenario = sys.argv[1]
    _, _rank, _world, _out = init_rank(sys.argv, timeout_s=5.0 if "dead" in _scenario else 30.0)
    WORKERS[_scenario](_rank, _world, _out)
