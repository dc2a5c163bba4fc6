"""Cost of the per-step agreement check of GradientCalibrator under torch.distributed.

Two gloo ranks on this machine (subprocesses meeting through a file) train the
same small two-modality model; each round times one ``backward`` step with
the agreement check (the shipped calibrator) and one without it (the check
replaced by a no-op), interleaved, so that machine load affects both alike.
It reports the median step time of each and their ratio, and the median time
of the check's ``all_gather`` alone, and writes
``benchmarks/results/distributed.json`` (rank 0's view).

Usage::

    python benchmarks/distributed.py                 # 40 rounds, batch 64 per rank
    python benchmarks/distributed.py --rounds 10 --batch 16 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rank(rank: int, init: str, rounds: int, batch: int, samples: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from bogc_core.integrations.torch import GradientCalibrator
    from bogc_core.integrations.torch.distributed import Agreement
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    enc_a, enc_b = nn.Linear(32, 64), nn.Linear(16, 64)
    heads = nn.ModuleDict({"a": nn.Linear(64, 4), "b": nn.Linear(64, 4), "f": nn.Linear(128, 4)})
    model = nn.ModuleDict({"enc_a": enc_a, "enc_b": enc_b, "heads": heads})
    ce = nn.CrossEntropyLoss(reduction="none")
    g = torch.Generator().manual_seed(rank)
    xa, xb = torch.randn(batch, 32, generator=g), torch.randn(batch, 16, generator=g)
    y = torch.randint(0, 4, (batch,), generator=g)

    def losses():
        za, zb = torch.tanh(enc_a(xa)), torch.tanh(enc_b(xb))
        return {"a": ce(heads["a"](za), y), "b": ce(heads["b"](zb), y),
                "fusion": ce(heads["f"](torch.cat([za, zb], 1)), y)}

    checked = GradientCalibrator(model.named_parameters(), samples=samples, model=model)
    unchecked = GradientCalibrator(model.named_parameters(), samples=samples, model=model)
    # no fingerprint and no collective: the calibrator as it was before the check
    unchecked.distributed.agreement.check = lambda *args: set()  # type: ignore[method-assign]
    unchecked.distributed.agreement.keys = lambda *args: (0, 0)  # type: ignore[method-assign]
    times: dict[str, list[float]] = {"checked": [], "unchecked": [], "all_gather": []}
    probe = Agreement()
    from bogc_core.integrations.torch.distributed import LocalView

    view = LocalView(step=0, names=["a", "b", "fusion"], empty=[])
    for r in range(rounds + 2):  # two warm-up rounds
        for name, cal in (("checked", checked), ("unchecked", unchecked)):
            dist.barrier()
            t0 = time.perf_counter()
            cal.backward(losses())
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        probe.check(view, dist.group.WORLD, None)
        if r >= 2:
            times["all_gather"].append(time.perf_counter() - t0)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {
            "world_size": 2, "backend": "gloo", "device": "cpu", "samples": samples,
            "batch_per_rank": batch, "rounds": rounds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "median_step_s": {"checked": med["checked"], "unchecked": med["unchecked"]},
            "ratio_checked_over_unchecked": med["checked"] / med["unchecked"],
            "median_check_all_gather_s": med["all_gather"],
            "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0],
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
    # gloo's threads free the last collective's tensors under the GIL; let them finish
    # before the interpreter exits (examples/train_distributed.py says why)
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds (default: 40)")
    ap.add_argument("--batch", type=int, default=64, help="examples per rank (default: 64)")
    ap.add_argument("--samples", default="microbatch", choices=["microbatch", "per_example"],
                    help="sample source (default: microbatch)")
    ap.add_argument("--out", default=str(HERE / "results" / "distributed.json"),
                    help="JSON output (default: benchmarks/results/distributed.json)")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        _rank(args.rank, args.init, args.rounds, args.batch, args.samples, args.out)
        return
    init = os.path.join(tempfile.mkdtemp(), "init")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, __file__, "--rounds", str(args.rounds), "--batch", str(args.batch),
            "--samples", args.samples, "--out", args.out, "--init", init]
    procs = [subprocess.Popen(base + ["--rank", str(r)], env=env) for r in range(2)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    main()
