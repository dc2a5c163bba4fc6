"""Kernel benchmark: the fast paths against their memory floors, in one run.

Every figure is a ratio to a floor timed in the same run: implementations are
timed in interleaved rounds (one call of each per round) and the medians are
compared, so a busy machine slows all of them alike.

Implementations (float32 by default, statistics of ``S`` sources over ``D``
dimensions, one count per source, 10% exactly-zero means):

- ``floor-grad`` (torch) / ``floor-grad-np``: one sum over the stacked
  ``(2S, D)`` statistics into a preallocated ``D``-vector: reads every
  statistic once and writes one gradient. The floor of ``calibrate_gradient``.
- ``floor-full``: a copy of the ``2S`` statistics into a fresh
  ``(2S + 3, D)`` buffer whose last three rows are zeroed: reads ``2S``
  arrays and writes ``2S + 3``, what a full ``calibrate`` must at least do.
- ``numpy-grad`` / ``torch-grad``: the fast path's ``calibrate_gradient``
  (gradient only, into a preallocated ``out``); with ``numba`` installed
  (extra ``[fast]``) this runs the compiled loops, and
  ``numpy-grad-engine`` / ``torch-grad-engine`` the array engine alone;
- ``numpy-public`` / ``torch-public``: ``bogc_core.calibrate_gradient(stats, config,
  out=out)``, the public function with its default value checks (what a caller sees);
- ``numpy-full`` / ``torch-full``: the fast path's ``calibrate`` (every output);
- ``numpy-before`` / ``torch-before``: ``bogc_core.calibrate(stats).gradient``,
  the way a caller got the gradient before ``calibrate_gradient`` existed
  (full result, with the value checks);
- ``torch-native-grad`` (``--native``): the tensor engine that CUDA runs, on the CPU;
- on ``--device cuda``: ``torch-grad``/``cupy-grad`` and the device copy bandwidth.

Scaling: time against ``D`` (1e4 .. 1e7; 1e8 with ``--big``, about 24 GB
for the reference-free paths at S = 3) and against ``S`` (2 .. 16 at one D).

Usage::

    python benchmarks/kernel.py --quick          # D = 1e7, S = 3 and small sweeps
    python benchmarks/kernel.py                  # full sweeps
    python benchmarks/kernel.py --device cuda    # GPU numbers (benchmarks/gpu_check.sh)

Writes ``benchmarks/results/kernel.json`` (or ``--out``) and, with
``--plot``, ``docs/img/kernel_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved rounds (after a warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_stats(D: int, S: int, dtype: str, seed: int = 0) -> list[tuple[float, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(S):
        m = rng.standard_normal(D, dtype=np.float32).astype(dtype) * (k + 1)
        m[rng.random(D, dtype=np.float32) < 0.1] = 0.0  # dead units
        m2 = (rng.random(D, dtype=np.float32).astype(dtype) + 0.1) * 7.0 * (k + 1) ** 2
        out.append((8.0, m, m2))
    return out


def case(
    D: int,
    S: int,
    dtype: str,
    device: str,
    rounds: int,
    full: bool,
    before: bool,
    native: bool,
) -> dict[str, Any]:
    """Median times of every implementation for one (D, S), and their ratios."""
    import torch
    from bogc_core.backends import numpy_fused, torch_fused

    from bogc_core import CalibrationConfig, GradientStats, calibrate, calibrate_gradient
    from bogc_core._namespace import resolve

    raw = make_stats(D, S, dtype)
    names = [f"s{k}" for k in range(S)]
    lam = [1.0] * S
    cfg = CalibrationConfig()
    tdev = torch.device(device)
    tdt = getattr(torch, dtype)
    t_stats = [
        GradientStats(torch.tensor(n, dtype=tdt, device=tdev), torch.from_numpy(m).to(tdev),
                      torch.from_numpy(v).to(tdev))
        for n, m, v in raw
    ]
    t_space = resolve(t_stats[0].mean)
    stacked = torch.stack([x for s in t_stats for x in (s.mean, s.m2)])
    t_out = torch.empty(D, dtype=tdt, device=tdev)
    fl_out = torch.empty(D, dtype=tdt, device=tdev)
    fns: dict[str, Callable[[], Any]] = {
        "floor-grad": lambda: torch.sum(stacked, dim=0, out=fl_out),
        "torch-grad": lambda: torch_fused.calibrate_gradient(
            t_space, names, t_stats, lam, cfg, out=t_out
        ),
    }
    if native:
        fns["torch-native-grad"] = lambda: torch_fused.calibrate_gradient(
            t_space, names, t_stats, lam, cfg, out=t_out, native=True
        )
    if device == "cpu":
        n_stats = [GradientStats(np.asarray(n, dtype=dtype), m, v) for n, m, v in raw]
        n_space = resolve(n_stats[0].mean)
        n_stacked = np.stack([x for _, m, v in raw for x in (m, v)])
        n_out = np.empty(D, dtype=dtype)
        n_fl = np.empty(D, dtype=dtype)
        fns["floor-grad-np"] = lambda: np.sum(n_stacked, axis=0, out=n_fl)
        fns["numpy-grad"] = lambda: numpy_fused.calibrate_gradient(
            n_space, names, n_stats, lam, cfg, out=n_out
        )
        # What a caller of the public function sees: the core's checks of the
        # inputs and of the options, the values check of every statistic and of
        # the result (folded into the compiled loops' passes where they run).
        fns["numpy-public"] = lambda: calibrate_gradient(n_stats, cfg, out=n_out)
        fns["torch-public"] = lambda: calibrate_gradient(t_stats, cfg, out=t_out)
        if full:

            def floor_full() -> Any:
                o = torch.empty((2 * S + 3, D), dtype=tdt)
                o[: 2 * S].copy_(stacked)
                o[2 * S :].zero_()
                return o

            fns["floor-full"] = floor_full
            fns["numpy-full"] = lambda: numpy_fused.calibrate(n_space, names, n_stats, lam, cfg)
            fns["torch-full"] = lambda: torch_fused.calibrate(t_space, names, t_stats, lam, cfg)
        if before:
            fns["numpy-before"] = lambda: calibrate(n_stats, cfg).gradient
            fns["torch-before"] = lambda: calibrate(t_stats, cfg).gradient
    else:
        copy_dst = torch.empty_like(stacked)
        fns["device-copy"] = lambda: copy_dst.copy_(stacked)
        try:
            import cupy
            from bogc_core.backends import cupy_fused

            c_stats = [GradientStats(cupy.asarray(np.asarray(n, dtype=dtype)), cupy.asarray(m),
                                     cupy.asarray(v)) for n, m, v in raw]
            c_space = resolve(c_stats[0].mean)
            c_out = cupy.empty(D, dtype=dtype)
            fns["cupy-grad"] = lambda: cupy_fused.calibrate_gradient(
                c_space, names, c_stats, lam, cfg, out=c_out
            )
        except Exception as exc:  # noqa: BLE001 - CuPy is optional on a GPU machine
            print(f"cupy-grad skipped: {type(exc).__name__}: {exc}", flush=True)
    from bogc_core.backends import _numba_kernel

    if device == "cpu" and _numba_kernel.AVAILABLE:
        # The default rows run the compiled loops; these rows the array engine.
        def engine(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                _numba_kernel.ENABLED[0] = False
                try:
                    return fn()
                finally:
                    _numba_kernel.ENABLED[0] = True

            return run

        fns["numpy-grad-engine"] = engine(fns["numpy-grad"])
        fns["torch-grad-engine"] = engine(fns["torch-grad"])
    t = interleaved(fns, rounds, device)
    item = np.dtype(dtype).itemsize
    row: dict[str, Any] = {"D": D, "S": S, "dtype": dtype, "device": device, "time_s": t}
    ratios = {}
    for k, v in t.items():
        if k.startswith("floor") or k == "device-copy":
            continue
        if k.startswith("numpy"):
            base = "floor-grad-np"
            ratios[k + "/torch-floor"] = v / t["floor-grad"]
        elif k.endswith("-full"):
            base = "floor-full"
        else:
            base = "floor-grad"
        ratios[k] = v / t[base]
    row["ratio_to_floor"] = ratios
    if "numpy-before" in t:
        row["speedup_grad_vs_before"] = {
            "numpy": t["numpy-before"] / t["numpy-grad"],
            "torch": t["torch-before"] / t["torch-grad"],
        }
    if device != "cpu":
        copy_bw = 2 * stacked.numel() * item / t["device-copy"]
        row["copy_gbps"] = copy_bw / 1e9
        grad_bytes = (2 * S + 1) * D * item
        row["fraction_of_copy_bandwidth"] = {
            k: grad_bytes / t[k] / copy_bw for k in t if k.endswith("-grad")
        }
    return row


def plot(rows_d: list[dict], rows_s: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    Ds = [r["D"] for r in rows_d]
    for k in ("floor-grad", "numpy-grad", "torch-grad"):
        ax1.loglog(Ds, [r["time_s"][k] * 1e3 for r in rows_d], marker="o", label=k)
    ax1.set_xlabel("D (dimensions), S = 3")
    ax1.set_ylabel("median time (ms)")
    ax1.set_title("calibrate_gradient vs D")
    ax1.legend()
    Ss = [r["S"] for r in rows_s]
    for k in ("numpy-grad", "torch-grad"):
        ax2.plot(Ss, [r["ratio_to_floor"][k] for r in rows_s], marker="o", label=k)
    ax2.set_xlabel(f"S (sources), D = {rows_s[0]['D']:.0e}")
    ax2.set_ylabel("time / floor (same run)")
    ax2.set_title("ratio to the memory floor vs S")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _numba_version() -> str | None:
    try:
        import numba
    except ImportError:
        return None
    return str(numba.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and shorter sweeps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads and the compiled loops' threads (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    p.add_argument("--big", action="store_true", help="add D = 1e8 to the D sweep")
    p.add_argument("--native", action="store_true", help="also time the tensor engine on the CPU")
    p.add_argument("--grad-only", action="store_true",
                   help="D = 1e7 case: only the calibrate_gradient rows and their floors")
    p.add_argument("--no-sweep", action="store_true", help="only the D = 1e7, S = 3 case")
    p.add_argument("--plot", action="store_true", help="write docs/img/kernel_scaling.png")
    p.add_argument("--out", default=str(HERE / "results" / "kernel.json"))
    a = p.parse_args(argv)
    load_start = os.getloadavg()

    import torch

    torch.set_num_threads(a.threads)
    from bogc_core.backends import numpy_fused

    # NumPy inputs take the module setting, torch inputs torch's count.
    numpy_fused.set_threads(a.threads)
    rounds = a.rounds or (3 if a.quick else 7)
    cpu_rows = a.device == "cpu" and not a.grad_only
    main_row = case(10**7, 3, a.dtype, a.device, rounds, cpu_rows, cpu_rows, a.native)
    print(json.dumps(main_row, indent=1), flush=True)
    rows_d: list[dict] = []
    rows_s: list[dict] = []
    if not a.no_sweep:
        sizes = [10**4, 10**5, 10**6, 10**7] + ([10**8] if a.big else [])
        for D in sizes:
            r = case(D, 3, a.dtype, a.device, rounds, False, False, False)
            rows_d.append(r)
            print(f"D={D:.0e} S=3 " + " ".join(f"{k}={v:.2f}x" for k, v in r["ratio_to_floor"].items()), flush=True)
        for S in ([2, 3, 6, 16] if a.quick else [2, 3, 4, 6, 8, 12, 16]):
            r = case(10**6, S, a.dtype, a.device, rounds, False, False, False)
            rows_s.append(r)
            print(f"D=1e6 S={S} " + " ".join(f"{k}={v:.2f}x" for k, v in r["ratio_to_floor"].items()), flush=True)
        if a.plot and a.device == "cpu":
            plot(rows_d, rows_s, ROOT / "docs" / "img" / "kernel_scaling.png")
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "numpy_threads": a.threads,
        "rounds": rounds,
        "numba": _numba_version(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": os.getloadavg(),
        "argv": sys.argv[1:] if argv is None else argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps({"info": info, "d1e7_s3": main_row, "vs_D": rows_d, "vs_S": rows_s}, indent=1)
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
