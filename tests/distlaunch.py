"""Start a test file's worker on N local ranks (gloo on CPU) and collect what each wrote.

Each rank is a fresh ``python <file> <scenario> <rank> <world> <init file> <out dir>``
subprocess (not ``multiprocessing.spawn``, which re-runs the parent's main
script), so a rank that aborts shows up as a non-zero exit code instead of
taking the test run with it, and a hang is cut by ``timeout``. The ranks meet
through a file in the test's temporary folder (no port to pick).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

__all__ = ["run_ranks", "init_rank", "end_rank"]


def run_ranks(script: str, scenario: str, out_dir: Path, world: int = 2, timeout: float = 90.0
              ) -> list[tuple[int, str]]:
    """``(exit code, stdout + stderr)`` of each rank; raises if a rank is still running at ``timeout``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    init = out_dir / f"init-{scenario}"
    procs = [
        subprocess.Popen(
            [sys.executable, script, scenario, str(r), str(world), str(init), str(out_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        for r in range(world)
    ]
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def init_rank(argv: list[str], timeout_s: float = 30.0) -> tuple[str, int, int, Path]:
    """Parse a worker's ``argv`` and join the gloo process group; ``(scenario, rank, world, out)``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    scenario, rank, world, init, out = argv[1], int(argv[2]), int(argv[3]), argv[4], Path(argv[5])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return scenario, rank, world, out


def end_rank() -> None:
    """Leave the process group so that the rank exits cleanly.

    gloo's worker threads free a finished collective's tensors after the
    caller's wait returns, taking the GIL to do so; one still at it when the
    interpreter shuts down aborts the process. Once FSDP is imported the group
    outlives ``destroy_process_group`` (its threads are never joined), so the
    barrier waits for every rank and the sleep releases the GIL while the
    threads finish.
    """
    import torch.distributed as dist

    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()
