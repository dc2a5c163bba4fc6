"""Kernel benchmark: reference vs fused calibration vs the memory floor, in one run.

For every ``D`` (dimensions) and ``S`` (sources) it times, on float32 by default:

- ``numpy-reference`` / ``torch-reference``: ``calibrate(..., backend="reference")``;
- ``numpy-fused`` / ``torch-fused`` (and ``torch-fused-cuda``, ``cupy-fused``
  on a GPU): ``calibrate`` through the fused path, plus ``*-runner``, the
  fused runner alone on already validated inputs (``calibrate`` first checks
  every input for NaN/inf and negative values, which is the core's work);
- two floors, measured in the same run on the same bytes:
  ``floor-grad``: ``torch.sum(stacked_stats, dim=0)``, one pass that reads
  every ``(mean, M2)`` and writes one fresh ``D`` gradient;
  ``floor-out``: one copy that reads the same statistics and writes fresh
  memory of the size of everything a ``Calibration`` returns
  (``(2S + 3) * D``: gradient, weights, evidence, uncertainty, belief scale).

It prints time, effective GB/s (input + output bytes of the call / time),
the ratios to both floors and the speedup over the NumPy reference, and
writes ``benchmarks/results/kernel.json``. Peak extra memory of one fused
call is measured in a fresh subprocess from the kernel's peak resident set
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``)
minus the resident set before the call minus the outputs: ``tracemalloc``
does not see PyTorch's allocations.

Usage::

    python benchmarks/kernel.py               # D in {1e5,1e6,1e7}, S in {2,3,6}
    python benchmarks/kernel.py --quick       # D in {1e5,1e6}, S = 3
    python benchmarks/kernel.py --sizes 1e7 --sources 3 --threads 2
    python benchmarks/kernel.py --device cuda # GPU paths (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        try:
            import cupy

            cupy.cuda.Device().synchronize()
        except Exception:  # noqa: BLE001 - cupy is optional
            pass


def timeit(fn: Callable[[], Any], repeat: int, device: str, budget_s: float = 20.0) -> float:
    """Best of ``repeat`` runs after one warm-up (fewer if a run is slow)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    n = max(1, min(repeat, int(budget_s / max(first, 1e-9))))
    best = float("inf")
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def make_numpy(
    D: int, S: int, dtype: str, seed: int = 0
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(S):
        m = rng.standard_normal(D, dtype=np.float32).astype(dtype) * (k + 1)
        m2 = (rng.random(D, dtype=np.float32).astype(dtype) + 0.1) * 7.0 * (k + 1) ** 2
        out.append((8.0, m, m2))
    return out


def bench_case(
    D: int, S: int, dtype: str, device: str, repeat: int, ref_limit: int, compiled: bool = False
) -> list[dict]:
    import torch

    from bogc_core import CalibrationConfig, GradientStats, calibrate
    from bogc_core.calibrate import prepare_sources
    from bogc_core.dispatch import _REGISTRY, available

    available()
    item = np.dtype(dtype).itemsize
    raw = make_numpy(D, S, dtype)
    in_bytes = 2 * S * D * item
    out_bytes = (2 * S + 3) * D * item
    rows: list[dict] = []
    ref_cfg = CalibrationConfig(backend="reference")

    def add(impl: str, t: float, nbytes: int, **extra: Any) -> None:
        rows.append(
            {
                "impl": impl,
                "D": D,
                "S": S,
                "dtype": dtype,
                "device": device,
                "time_s": t,
                "gbps": nbytes / t / 1e9,
                **extra,
            }
        )

    tdev = torch.device(device)
    t_stats = [
        GradientStats(
            torch.tensor(n, dtype=getattr(torch, dtype), device=tdev),
            torch.from_numpy(m).to(tdev),
            torch.from_numpy(m2).to(tdev),
        )
        for n, m, m2 in raw
    ]
    stacked = torch.stack([x for s in t_stats for x in (s.mean, s.m2)])

    def floor_grad():
        return torch.sum(stacked, dim=0)

    def floor_out():
        buf = torch.empty((2 * S + 3, D), dtype=stacked.dtype, device=tdev)
        buf[: 2 * S].copy_(stacked)
        buf[2 * S :].copy_(stacked[:3])
        return buf

    add("floor-grad", timeit(floor_grad, repeat, device), in_bytes + D * item)
    add("floor-out", timeit(floor_out, repeat, device), in_bytes + out_bytes)

    if device == "cpu":
        n_stats = [GradientStats(np.asarray(n, dtype=dtype), m, m2) for n, m, m2 in raw]
        if D * S <= ref_limit:
            add(
                "numpy-reference",
                timeit(lambda: calibrate(n_stats, ref_cfg), repeat, device),
                in_bytes + out_bytes,
            )
        add("numpy-fused", timeit(lambda: calibrate(n_stats), repeat, device), in_bytes + out_bytes)
        names, st, lam, space = prepare_sources(n_stats)
        runner = _REGISTRY["numpy-fused"][1]
        add(
            "numpy-fused-runner",
            timeit(lambda: runner(space, names, st, lam, CalibrationConfig()), repeat, device),
            in_bytes + out_bytes,
        )
        del n_stats, st
    if D * S <= ref_limit:
        add(
            "torch-reference",
            timeit(lambda: calibrate(t_stats, ref_cfg), repeat, device),
            in_bytes + out_bytes,
        )
    tname = "torch-fused" if device == "cpu" else "torch-fused-cuda"
    add(tname, timeit(lambda: calibrate(t_stats), repeat, device), in_bytes + out_bytes)
    names, st, lam, space = prepare_sources(t_stats)
    runner = _REGISTRY["torch-fused"][1]
    add(
        tname + "-runner",
        timeit(lambda: runner(space, names, st, lam, CalibrationConfig()), repeat, device),
        in_bytes + out_bytes,
    )
    if compiled and device == "cpu" and "torch-compiled" in _REGISTRY:
        # Opt-in torch.compile path: the first call compiles (or re-uses the
        # compilation of an earlier size); it is timed apart as compile_s.
        ccfg = CalibrationConfig(backend="torch-compiled")
        t0 = time.perf_counter()
        first = calibrate(t_stats, ccfg)
        first_s = time.perf_counter() - t0
        if first.flags.get("path") != "torch-compiled":
            print(f"torch-compiled fell back: {first.flags.get('fallback')}", file=sys.stderr)
        else:
            del first
            t = timeit(lambda: calibrate(t_stats, ccfg), repeat, device)
            add("torch-compiled", t, in_bytes + out_bytes, compile_s=max(first_s - t, 0.0))
            crunner = _REGISTRY["torch-compiled"][1]
            add(
                "torch-compiled-runner",
                timeit(lambda: crunner(space, names, st, lam, ccfg), repeat, device),
                in_bytes + out_bytes,
            )
    if device == "cuda" and "cupy-fused" in _REGISTRY:
        import cupy

        c_stats = [
            GradientStats(
                cupy.asarray(np.asarray(n, dtype=dtype)), cupy.asarray(m), cupy.asarray(m2)
            )
            for n, m, m2 in raw
        ]
        add("cupy-fused", timeit(lambda: calibrate(c_stats), repeat, device), in_bytes + out_bytes)
        names, st, lam, space = prepare_sources(c_stats)
        runner = _REGISTRY["cupy-fused"][1]
        add(
            "cupy-fused-runner",
            timeit(lambda: runner(space, names, st, lam, CalibrationConfig()), repeat, device),
            in_bytes + out_bytes,
        )
        cflat = cupy.concatenate([x for s in c_stats for x in (s.mean, s.m2)])
        add("cupy-copy", timeit(lambda: cflat.copy(), repeat, device), 2 * cflat.nbytes)

    floors = {r["impl"]: r["time_s"] for r in rows if r["impl"].startswith("floor")}
    ref = next((r["time_s"] for r in rows if r["impl"] == "numpy-reference"), None)
    copy = next((r["gbps"] for r in rows if r["impl"] == "cupy-copy"), None)
    for r in rows:
        # GPU target: the fused kernel's effective bandwidth over the device's copy bandwidth.
        r["fraction_of_copy_bandwidth"] = (r["gbps"] / copy) if copy else None
        r["ratio_floor_grad"] = r["time_s"] / floors["floor-grad"]
        r["ratio_floor_out"] = r["time_s"] / floors["floor-out"]
        r["speedup_vs_numpy_reference"] = (ref / r["time_s"]) if ref else None
    return rows


_MEM_SNIPPET = r"""
import sys, json, numpy as np, torch
sys.path.insert(0, {here!r})  # for make_numpy; bogc_core comes from the installed package
torch.set_num_threads({threads})
from bogc_core import GradientStats, CalibrationConfig
from bogc_core.calibrate import prepare_sources
from bogc_core.dispatch import _REGISTRY, available
from kernel import make_numpy
available()
D, S, impl = {D}, {S}, {impl!r}
raw = make_numpy(D, S, {dtype!r})
if impl.startswith("torch"):
    stats = [GradientStats(torch.tensor(n, dtype=torch.{dtype}), torch.from_numpy(m), torch.from_numpy(m2)) for n, m, m2 in raw]
else:
    stats = [GradientStats(np.asarray(n, dtype={dtype!r}), m, m2) for n, m, m2 in raw]
names, st, lam, space = prepare_sources(stats)
cfg = CalibrationConfig(backend="reference") if impl.endswith("reference") else CalibrationConfig()
if impl.endswith("reference"):
    from bogc_core.calibrate import reference_calibrate
    call = lambda: reference_calibrate(names, st, lam, space, cfg)
else:
    runner = _REGISTRY[impl][1]
    call = lambda: runner(space, names, st, lam, cfg)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
rss0 = status("VmRSS:")
out = call()
peak = status("VmHWM:")
item = np.dtype({dtype!r}).itemsize
outputs = (2 * S + 3) * D * item
print(json.dumps({{"impl": impl, "D": D, "S": S, "rss_before": rss0, "peak": peak,
                  "extra_bytes": peak - rss0 - outputs, "output_bytes": outputs,
                  "extra_elements": (peak - rss0 - outputs) / item,
                  "budget_elements": (S + 2) * D}}))
"""


def measure_memory(D: int, S: int, dtype: str, impl: str, threads: int) -> dict | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = _MEM_SNIPPET.format(here=str(HERE), D=D, S=S, impl=impl, dtype=dtype, threads=threads)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="D in {1e5, 1e6}, S = 3")
    p.add_argument("--sizes", default=None, help="comma list of D, e.g. 1e5,1e6")
    p.add_argument("--sources", default=None, help="comma list of S, e.g. 2,3,6")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--ref-limit",
        type=float,
        default=3e7,
        help="skip the references above this D*S (they need ~20 (S, D) temporaries)",
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time the opt-in torch-compiled backend (CPU; compile time reported apart)",
    )
    p.add_argument("--out", default=str(HERE / "results" / "kernel.json"))
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = (
        [int(float(x)) for x in a.sizes.split(",")]
        if a.sizes
        else ([10**5, 10**6] if a.quick else [10**5, 10**6, 10**7])
    )
    sources = (
        [int(x) for x in a.sources.split(",")] if a.sources else ([3] if a.quick else [2, 3, 6])
    )

    rows: list[dict] = []
    hdr = f"{'impl':24s} {'D':>9s} {'S':>2s} {'time ms':>10s} {'GB/s':>7s} {'/floor-out':>10s} {'/floor-grad':>11s} {'vs np-ref':>9s}"
    print(hdr)
    for D in sizes:
        for S in sources:
            for r in bench_case(D, S, a.dtype, a.device, a.repeat, int(a.ref_limit), a.compiled):
                rows.append(r)
                sp = r["speedup_vs_numpy_reference"]
                print(
                    f"{r['impl']:24s} {D:9d} {S:2d} {r['time_s'] * 1e3:10.2f} {r['gbps']:7.2f} "
                    f"{r['ratio_floor_out']:10.2f} {r['ratio_floor_grad']:11.2f} "
                    f"{(f'{sp:.1f}x' if sp else '-'):>9s}"
                    + (
                        f"  {r['fraction_of_copy_bandwidth']:.0%} of copy BW"
                        if r["fraction_of_copy_bandwidth"]
                        else ""
                    ),
                    flush=True,
                )
                if "compile_s" in r:
                    print(f"{'':24s} (first call: {r['compile_s']:.1f} s of compilation)")
    memory = []
    if not a.no_memory and a.device == "cpu":
        D, S = max(sizes), (3 if 3 in sources else sources[0])
        for impl in ("torch-fused", "numpy-fused", "torch-reference"):
            m = measure_memory(D, S, a.dtype, impl, torch.get_num_threads())
            if m:
                memory.append(m)
                print(
                    f"peak extra memory {impl:16s} D={D} S={S}: {m['extra_bytes'] / 2**20:8.1f} MiB = "
                    f"{m['extra_elements'] / D:6.2f} x D elements (budget (S+2) = {S + 2} x D; "
                    f"RSS counters are exact to ~2 MiB)"
                )
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_at_end": os.getloadavg(),
        "argv": sys.argv[1:],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"info": info, "rows": rows, "memory": memory}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
