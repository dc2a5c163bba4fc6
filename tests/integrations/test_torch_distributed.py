"""GradientCalibrator under torch.distributed (gloo, 2 processes on this machine).

Each rank sees half of the batch; the statistics are all-reduced, so both
ranks must write the same ``p.grad`` as one process that saw the whole batch
(bit-identical across ranks, equal to the single process up to rounding).
A rank that dies must surface as a clear error on its peer, not a hang.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from bogc_core.integrations.torch import DistributedError, GradientCalibrator  # noqa: E402
from torch import nn  # noqa: E402

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
    if kw.get("samples") == "laplace":
        kw["laplace_layers"] = {"fusion": m.fusion, "a": m.head_a, "b": m.head_b}
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


def _init(rank: int, init_file: str, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=timedelta(seconds=timeout_s),
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file, 60)
    try:
        res = {name: run_case(kw, rank) for name, (kw, _) in CASES.items()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dead_peer_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file, 5)
    # both ranks must finish connecting before one dies, or rank 0's own
    # init_process_group fails instead of the calibrator's collective
    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies before the collective
    torch.manual_seed(0)
    m = Net().double()
    cal = GradientCalibrator(m.named_parameters(), samples="per_example")
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
    with open(os.path.join(out_dir, "dead.txt"), "w") as fh:
        fh.write(f"{time.monotonic() - t0:.3f}\n{unchanged}\n{msg}")
    os._exit(0)  # skip destroy_process_group, which would wait for the dead peer


def _importable_workers(monkeypatch) -> None:
    # Spawned children unpickle the worker by module name; make this file's
    # package importable for them whatever pytest's import mode is.
    # Children copy the parent's sys.path, so extend that.
    # Appended, not prepended: the repository root holds the bogc_core source
    # folder, which must not shadow the installed package (where backends/ and
    # integrations/ are mapped into bogc_core).
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [r for r in (here, os.path.dirname(os.path.dirname(here))) if r not in sys.path]
    monkeypatch.setattr(sys, "path", sys.path + roots)


@pytest.mark.slow
def test_two_ranks_equal_single_process_on_global_batch(tmp_path, monkeypatch):
    _importable_workers(monkeypatch)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
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
def test_dead_peer_raises_clear_error(tmp_path, monkeypatch):
    _importable_workers(monkeypatch)
    t0 = time.monotonic()
    mp.spawn(_dead_peer_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    elapsed, unchanged, msg = (tmp_path / "dead.txt").read_text().split("\n", 2)
    assert msg.startswith("DistributedError"), msg
    assert "rank 0 of 2" in msg and "peer" in msg
    assert unchanged == "True"
    assert time.monotonic() - t0 < 60

