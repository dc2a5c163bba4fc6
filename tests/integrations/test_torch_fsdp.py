"""GradientCalibrator on FSDP2 (``fully_shard``) and DDP models, 2 gloo ranks on CPU.

Each rank holds half of the global batch. Under FSDP2 the parameters are
sharded DTensors; the calibrated gradient written into each rank's sharded
``p.grad`` must, gathered, equal what one process computes on the global
batch with the unsharded model (float64, 1e-6 and in practice round-off), for
every sample source (``laplace`` with its Linear Fisher shortcut on
``fully_shard`` layers), over steps with an optimizer
in between. Under DDP the calibrator's own all-reduce must be the only one:
DDP's gradient all-reduce (counted by a communication hook) never runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # a rank started by run_ranks: tests/ holds distlaunch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from bogc_core.integrations.torch import GradientCalibrator  # noqa: E402
from distlaunch import end_rank, init_rank, run_ranks  # noqa: E402
from torch import nn  # noqa: E402
from torchtools import source  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo"
)

B = 12  # global batch; each of the 2 ranks takes 6 examples
STEPS = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(5, 6)
        self.enc_b = nn.Linear(4, 7)  # odd rows: FSDP2 pads the last shard
        self.fusion = nn.Linear(13, 3)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(7, 3)

    def forward(self, xa, xb):
        za, zb = torch.tanh(self.enc_a(xa)), torch.tanh(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], 1)), self.head_a(za), self.head_b(zb)


def data(step: int):
    g = torch.Generator().manual_seed(200 + step)
    return (torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randn(B, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def losses(outs, y):
    ce = nn.CrossEntropyLoss(reduction="none")
    f, a, b = outs
    return {"fusion": ce(f, y), "a": ce(a, y), "b": ce(b, y)}


CASES = {
    # name: (calibrator kwargs per rank, kwargs of the equivalent single process)
    "per_example": (dict(samples="per_example"), dict(samples="per_example")),
    "per_example_shortcut": (dict(samples="per_example", model=True),
                             dict(samples="per_example", model=True)),
    # two micro-batches on each rank = four micro-batches of the global batch
    "microbatch": (dict(samples="microbatch", chunks=2), dict(samples="microbatch", chunks=4)),
    "microbatch_shortcut": (dict(samples="microbatch", chunks=2, model=True),
                            dict(samples="microbatch", chunks=4, model=True)),
    # the same seed on every rank: the same draws as one process
    "laplace": (dict(samples="laplace", laplace_layers=True, draws=4, seed=3),
                dict(samples="laplace", laplace_layers=True, draws=4, seed=3)),
    "steps": (dict(samples="steps"), dict(samples="steps")),
}


def sharded_net() -> Net:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net().double()
    for layer in (net.enc_a, net.enc_b, net.fusion, net.head_a, net.head_b):
        fully_shard(layer)
    fully_shard(net)
    return net


def train(kwargs: dict, rank: int | None, wrap: str | None = None, disagree_first: bool = False):
    """Full gradients of each step (SGD in between); rank None = one process, whole batch.

    ``disagree_first``: before the first step, one step in which rank 1 names
    a source differently; its outcome (the error message) is returned too.
    """
    torch.manual_seed(0)
    net = sharded_net() if wrap == "fsdp" else Net().double()
    model: nn.Module = net
    hook_calls = [0]
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)

        def count(state, bucket):  # DDP's gradient all-reduce, counted and not run
            hook_calls[0] += 1
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, count)
    kw = dict(kwargs)
    if kw.pop("model", False):
        kw["model"] = model
    # each source's last layer (fully_shard ones under FSDP2)
    layers = ({"fusion": net.fusion, "a": net.head_a, "b": net.head_b}
              if kw.pop("laplace_layers", False) else None)
    opts = {k: kw.pop(k) for k in ("chunks", "draws", "seed") if k in kw}
    kw["samples"] = source(kw["samples"], layers, **opts)
    cal = GradientCalibrator(net.named_parameters(), **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out, layout = [], {}
    if cal.samples.NAME == "laplace":  # the Linear Fisher shortcut must serve every head, sharded too
        fallback, full_fisher = [], cal.samples._fisher
        layout["fisher_fallback"] = fallback
        cal.samples._fisher = lambda *a, **k: fallback.append(1) or full_fisher(*a, **k)
    if disagree_first:
        xa, xb, y = data(0)
        sl = slice(rank * B // 2, (rank + 1) * B // 2)
        d = losses(model(xa[sl], xb[sl]), y[sl])
        if rank == 1:
            d["c"] = d.pop("b")
        try:
            cal.backward(d)
            layout["disagreement"] = "no error"
        except Exception as exc:  # checked by the test
            layout["disagreement"] = f"{type(exc).__name__}: {exc}"
        layout["untouched"] = all(p.grad is None for p in net.parameters())
    for step in range(STEPS):
        xa, xb, y = data(step)
        if rank is not None:
            sl = slice(rank * B // 2, (rank + 1) * B // 2)
            xa, xb, y = xa[sl], xb[sl], y[sl]
        # zeroed, not None, from the second step on: the calibrator copies into p.grad
        opt.zero_grad(set_to_none=False)
        diag = cal.backward(losses(model(xa, xb), y))
        if "model" in kw:  # the per-layer shortcut sees the unsharded layers too
            assert len(diag["shortcut_parameters"]) == 10, diag["shortcut_parameters"]
        grads = {}
        for n, p in net.named_parameters():
            if wrap == "fsdp":
                from torch.distributed.tensor import DTensor

                assert isinstance(p.grad, DTensor), (n, type(p.grad))
                layout[n] = (str(p.grad.placements), str(p.placements),
                             tuple(p.grad.to_local().shape), tuple(p.to_local().shape))
                grads[n] = p.grad.full_tensor().detach().clone()
            else:
                grads[n] = p.grad.detach().clone()
        out.append(grads)
        opt.step()
    return out, layout, hook_calls[0]


def _fsdp_worker(rank: int, world: int, out: Path) -> None:
    res = {name: train(kw, rank, "fsdp", disagree_first=name == "per_example")
           for name, (kw, _) in CASES.items()}
    torch.save(res, out / f"fsdp{rank}.pt")
    end_rank()


def _ddp_worker(rank: int, world: int, out: Path) -> None:
    res = {name: train(kw, rank, "ddp") for name, (kw, _) in CASES.items()
           if name in ("per_example", "microbatch_shortcut")}
    torch.save(res, out / f"ddp{rank}.pt")
    end_rank()


WORKERS = {"fsdp": _fsdp_worker, "ddp": _ddp_worker}


def _ranks_ok(scenario: str, out: Path) -> list:
    runs = run_ranks(__file__, scenario, out)
    for r, (rc, text) in enumerate(runs):
        assert rc == 0, f"rank {r} exited with {rc}:\n{text[-3000:]}"
    return [torch.load(out / f"{scenario}{r}.pt") for r in range(2)]


def _compare(res: list, tol: float = 1e-6) -> float:
    """Largest relative difference to one process over cases, steps and tensors (printed per case)."""
    worst = 0.0
    for name, (_, single_kw) in CASES.items():
        if name not in res[0]:
            continue
        single, _, _ = train(single_kw, None)
        case_rel, case_abs = 0.0, 0.0
        for step in range(STEPS):
            for n, gs in single[step].items():
                g0, g1 = res[0][name][0][step][n], res[1][name][0][step][n]
                assert torch.equal(g0, g1), (name, step, n)
                torch.testing.assert_close(g0, gs, rtol=tol, atol=tol, msg=f"{name} step {step} {n}")
                diff = float((g0 - gs).abs().max())
                case_abs = max(case_abs, diff)
                case_rel = max(case_rel, diff / max(float(gs.abs().max()), 1e-300))
        print(f"{name}: max abs difference {case_abs:.2e}, max relative {case_rel:.2e}")
        worst = max(worst, case_rel)
    return worst


@pytest.mark.slow
def test_fsdp2_equals_single_process(tmp_path):
    res = _ranks_ok("fsdp", tmp_path)
    worst = _compare(res)
    print(f"FSDP2 vs single process, largest relative difference: {worst:.3e}")
    for r in range(2):
        for name in CASES:
            for n, entry in res[r][name][1].items():
                if n in ("disagreement", "untouched"):
                    continue
                if n == "fisher_fallback":
                    assert entry == [], (r, name, entry)
                    continue
                gp, pp, gshape, pshape = entry
                assert gp == pp and gshape == pshape, (r, name, n, gp, pp, gshape, pshape)
    # the per_example run began with a step where the ranks disagreed: every rank raised
    # the same error, wrote nothing, and the FSDP2 training went on (equal above)
    msgs = [res[r]["per_example"][1]["disagreement"] for r in range(2)]
    assert msgs[0] == msgs[1] and msgs[0].startswith("DistributedError"), msgs
    assert "source names differ" in msgs[0]
    assert res[0]["per_example"][1]["untouched"] and res[1]["per_example"][1]["untouched"]


@pytest.mark.slow
def test_ddp_equals_single_process_without_ddp_allreduce(tmp_path):
    res = _ranks_ok("ddp", tmp_path)
    worst = _compare(res)
    print(f"DDP vs single process, largest relative difference: {worst:.3e}")
    for r in range(2):
        for name, (_, _, calls) in res[r].items():
            assert calls == 0, (r, name, calls)


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"


@pytest.mark.slow
def test_example_under_torchrun_matches_one_process(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(EXAMPLE), "--wrap", "fsdp", "--steps", "6", "--dtype", "float64"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    line = [x for x in run.stdout.splitlines() if "test accuracy" in x]
    assert len(line) == 1 and "ranks=2" in line[0], run.stdout
    single = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "6", "--dtype", "float64"], capture_output=True,
                            text=True, timeout=180, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # the same training in one process reaches the same accuracy (float64: round-off apart,
    # the same gradients at every step)
    assert line[0].split()[-1] == single.stdout.split()[-1], (line[0], single.stdout)


NO_FSDP = """
import sys, torch
from bogc_core.integrations.torch import GradientCalibrator
net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
cal = GradientCalibrator(net.named_parameters(), model=net)
out = net(torch.randn(8, 3))
cal.backward({"a": out[:, 0] ** 2, "b": out[:, 1] ** 2})
assert all(p.grad is not None for p in net.parameters())
print(sorted(m for m in ("torch.distributed.fsdp", "torch.distributed.tensor") if m in sys.modules))
"""


def test_calibrator_never_imports_fsdp_for_a_plain_model(tmp_path):
    # importing torch.distributed.fsdp keeps the default process group alive past
    # destroy_process_group (gloo's threads then race the interpreter's shutdown): the
    # FSDP2 checks look only at modules the caller imported. (Run from an empty folder:
    # the source tree's bogc_core folder would shadow the installed package.)
    import subprocess

    run = subprocess.run([sys.executable, "-c", NO_FSDP], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout


if __name__ == "__main__":
    _, _rank, _world, _out = init_rank(sys.argv)
    WORKERS[sys.argv[1]](_rank, _world, _out)
