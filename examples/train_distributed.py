"""BOGC-calibrated gradients with several processes: plain, DDP or FSDP2 (CPU + gloo, seconds).

Run on 2 processes of this machine::

    torchrun --nproc_per_node 2 examples/train_distributed.py --wrap fsdp
    torchrun --nproc_per_node 2 examples/train_distributed.py --wrap ddp --samples per_example

(``python examples/train_distributed.py`` runs the same loop in one process.)
Each rank takes its own share of every batch; the calibrator sums the
statistics of all ranks, so every rank writes the gradient one process would
compute on the whole batch (``docs/distributed.md``). With ``--wrap fsdp``
the parameters are sharded by ``fully_shard`` and each rank's ``p.grad`` is its
shard of that gradient.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from bogc_core.integrations.torch import GradientCalibrator, Microbatch, PerExample
from torch import nn


class TwoModalNet(nn.Module):
    def __init__(self, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.enc_a = nn.Linear(16, hidden)
        self.enc_b = nn.Linear(8, hidden)
        self.head_a, self.head_b = nn.Linear(hidden, classes), nn.Linear(hidden, classes)
        self.fusion = nn.Linear(2 * hidden, classes)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor):
        za, zb = torch.relu(self.enc_a(xa)), torch.relu(self.enc_b(xb))
        return self.fusion(torch.cat([za, zb], 1)), self.head_a(za), self.head_b(zb)


def make_data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    centers_a, centers_b = torch.randn(4, 16, generator=gen), torch.randn(4, 8, generator=gen)
    xa = centers_a[y] + 0.8 * torch.randn(n, 16, generator=gen)  # informative modality
    xb = centers_b[y] + 2.5 * torch.randn(n, 8, generator=gen)  # noisy modality
    return xa, xb, y


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wrap", choices=["none", "ddp", "fsdp"], default="fsdp",
                    help="how the model is distributed (default: fsdp)")
    ap.add_argument("--samples", choices=["microbatch", "per_example"], default="microbatch",
                    help="gradient samples of the calibrator (default: microbatch)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    ap.add_argument("--batch", type=int, default=64, help="global batch size (default: 64)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="parameter and data dtype (default: float32)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        # the calibrator's collectives raise DistributedError after this timeout
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial model on every rank
    dtype = getattr(torch, args.dtype)
    net = TwoModalNet().to(dtype)
    model: nn.Module = net
    if args.wrap == "fsdp" and distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in (net.enc_a, net.enc_b, net.head_a, net.head_b, net.fusion):
            fully_shard(layer)
        fully_shard(net)
    elif args.wrap == "ddp" and distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)  # its own all-reduce never runs (see the docs)
    # model= turns on the per-layer shortcut for the Linear layers. Micro-batches are
    # per rank: chunks=4 // world keeps 4 micro-batches of the global batch.
    samples = Microbatch(chunks=max(2, 4 // world)) if args.samples == "microbatch" else PerExample()
    cal = GradientCalibrator(net.named_parameters(), samples=samples, model=model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ce = nn.CrossEntropyLoss(reduction="none")
    xa, xb, y = make_data(args.batch * args.steps, seed=1)
    xa, xb = xa.to(dtype), xb.to(dtype)
    per_rank = args.batch // world
    for step in range(args.steps):
        # this rank's share of the global batch
        lo = step * args.batch + rank * per_rank
        sl = slice(lo, lo + per_rank)
        f, a, b = model(xa[sl], xb[sl])
        opt.zero_grad(set_to_none=True)
        cal.backward({"fusion": ce(f, y[sl]), "a": ce(a, y[sl]), "b": ce(b, y[sl])})
        opt.step()

    tx, tb, ty = make_data(512, seed=2)
    tx, tb = tx.to(dtype), tb.to(dtype)
    with torch.no_grad():
        acc = float((model(tx, tb)[0].argmax(1) == ty).double().mean())
    if rank == 0:
        print(f"wrap={args.wrap} samples={args.samples} ranks={world} test accuracy {acc:.3f}")
    if distributed:
        # gloo's worker threads free each finished collective's tensors after the caller's
        # wait returns, and take the GIL to do so; one still at it when the interpreter shuts
        # down aborts the process. FSDP keeps the group alive past destroy_process_group, so
        # its threads are never joined: after the barrier (every rank done), the sleep
        # releases the GIL while they finish.
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
    return acc


if __name__ == "__main__":
    main()
