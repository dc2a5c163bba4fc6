"""The CUDA kernels of ``cupy-fused``, checked without a GPU.

``nvcc``: every kernel, in every argument layout ``cupy_fused`` launches it
with, compiles for sm_80 and sm_90 in the translation unit CuPy builds
(``cuda_tu``), without a compiler error or warning, and ptxas fits it in
registers (no stack frame, no spills).

``cuda_host``: the same translation units, built with g++ (``cuda/cuda_host.h``
maps the CUDA built-ins; the threads of a block run as coroutines that meet
at ``__syncthreads``), run on NumPy arrays with CuPy's launch shapes:

- each reduction against its closed form in NumPy, for block sizes that do
  and do not divide ``D``, ``D = 1``, and with the threads of a block run in
  reverse order (a missing barrier would change the result);
- the whole ``cupy_fused`` full-result pipeline, the orchestration
  ``cupy_fused`` runs (``_cuda_kernels.full``) with host launches, against the reference
  ``calibrate`` for every option, both dtypes, scalar and per-dimension
  counts, zeros, a zero-variance source, a single sample, tiny and huge
  variances.

Both skip, saying so, when the compiler is not on ``PATH``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bogc_core.backends import _cuda_kernels as K

from bogc_core import CalibrationConfig, GradientStats, NormalGammaPrior, calibrate
from bogc_core._evidence import log_score
from bogc_core._posterior import posterior

from .conftest import RTOL
from .cuda_host import (
    ARCHS,
    DTYPES,
    FUSE_S,
    GXX_FLAGS,
    HostKernels,
    NvccResult,
    nvcc_compile,
    units,
)
from .cuda_tu import HEADERS
from .test_equivalence import CONFIGS, FIELDS

ENTRIES = units()


@pytest.fixture(scope="session")
def nvcc_builds(tmp_path_factory: Any) -> dict[str, NvccResult]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: the CUDA kernels were not compiled (CUDA toolkit)")
    if shutil.which("g++") is None:
        pytest.skip(
            "g++ not found on PATH: nvcc has no host compiler, the kernels were not compiled"
        )
    work = tmp_path_factory.mktemp("nvcc")
    return nvcc_compile(ENTRIES, ARCHS, work)


@pytest.fixture(scope="session")
def gxx() -> str:
    path = shutil.which("g++")
    if path is None:
        pytest.skip("g++ not found on PATH: the CUDA kernels were not built for the CPU")
    return path


@pytest.fixture(scope="session")
def host(gxx: str, tmp_path_factory: Any) -> HostKernels:
    hk = HostKernels(ENTRIES, Path(tmp_path_factory.mktemp("host")))
    assert hk.returncode == 0, hk.log
    return hk


@pytest.fixture
def hk(host: HostKernels) -> Any:
    """The host build with the default launch settings restored after each test."""
    yield host
    host.reverse, host.block, host.grid, host.reduce_block = False, 128, None, 512


# ---------------------------------------------------------------- nvcc


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_build_is_clean(nvcc_builds: dict[str, NvccResult], arch: str) -> None:
    r = nvcc_builds[arch]
    assert r.returncode == 0, r.log
    noise = [ln for ln in r.log.splitlines() if "warning" in ln.lower() or "error" in ln.lower()]
    assert not noise, "\n".join(noise)


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.unit.kernel)
def test_nvcc_compiles_kernel(nvcc_builds: dict[str, NvccResult], arch: str, entry: Any) -> None:
    r = nvcc_builds[arch]
    found = r.diagnostics(entry)
    assert not found, "\n".join(found)
    res = r.resources(entry.unit.kernel)
    why = " (the batch failed: see the units with diagnostics)" if r.returncode else ""
    assert res is not None, f"ptxas did not compile {entry.unit.kernel} for {arch}{why}"
    # Local memory (a stack frame or spills) would put the per-dimension arrays in DRAM.
    assert res["stack"] == 0 and res["spill_stores"] == 0 and res["spill_loads"] == 0, res
    assert res["registers"] <= 255, res


# ---------------------------------------------------------------- host: reductions


def _scores(n: Any, m: np.ndarray, m2: np.ndarray, prior: NormalGammaPrior, snr: bool) -> Any:
    """The reference's log scores (float64 copy of the inputs' dtype arithmetic)."""
    st = GradientStats(n, m, m2)
    return np.asarray(log_score(posterior(st, prior), "snr" if snr else "precision"))


def _score_args(n: Any, m: np.ndarray, m2: np.ndarray, prior: NormalGammaPrior, snr: bool):
    T = m.dtype.type
    scal = [np.asarray(v) for v in (T(n) if np.ndim(n) == 0 else n, T(prior.beta0))]
    common = [np.asarray(T(v)) for v in (prior.alpha0, prior.kappa0, prior.mu0)]
    tiny = np.asarray(T(np.finfo(m.dtype).smallest_normal))
    return (scal[0], m, m2, scal[1], *common, tiny, np.asarray(np.int32(snr)))


def _stats(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, zeros: bool = True):
    m = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape)
    m2 = rng.gamma(1.5, size=shape) * 7.0
    if zeros and m.size > 3:
        m.reshape(-1)[:: max(2, m.size // 5)] = 0.0  # dead units: score -inf under snr
    return m.astype(dtype), m2.astype(dtype)


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 7, 512, 1000, 4099])
@pytest.mark.parametrize("snr", [True, False])
def test_host_score_reductions(hk: HostKernels, dtype: str, D: int, snr: bool) -> None:
    rng = np.random.default_rng(D)
    m, m2 = _stats(rng, (D,), dtype)
    prior = NormalGammaPrior(mu0=0.3, kappa0=1.5, alpha0=0.5, beta0=0.2)
    for n in (8.0, 1.0):
        l = _scores(np.asarray(n, dtype=dtype), m, m2, prior, snr).astype(np.float64)
        finite = np.isfinite(l)
        args = _score_args(n, m, m2, prior, snr)
        total, count = hk.reduce(K.SCORE_SUM, *args), hk.reduce(K.SCORE_COUNT, *args)
        assert count == finite.sum()
        bound = RTOL[dtype] * np.sum(np.abs(l[finite])) + 1e-300
        assert abs(total - np.sum(l[finite])) <= bound, (total, np.sum(l[finite]))


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_reductions_block_schedule(hk: HostKernels, dtype: str) -> None:
    """Threads in reverse order give the same bits; any block size gives the same sum."""
    rng = np.random.default_rng(0)
    m, m2 = _stats(rng, (3001,), dtype)
    args = _score_args(5.0, m, m2, NormalGammaPrior(beta0=0.4), True)
    base = hk.reduce(K.SCORE_SUM, *args)
    hk.reverse = True
    assert hk.reduce(K.SCORE_SUM, *args) == base
    hk.reverse = False
    for block in (32, 64, 256):
        hk.reduce_block = block
        assert math.isclose(hk.reduce(K.SCORE_SUM, *args), base, rel_tol=1e-12)


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (9, 1), (33, 130)])
def test_host_eb_reductions(hk: HostKernels, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    rows = shape[0]
    n = rng.integers(0, 6, size=(rows, 1) if len(shape) == 2 else shape).astype(dtype)
    n.reshape(-1)[0] = 4  # at least one dimension with two samples
    m2 = (rng.gamma(1.5, size=shape) * 10.0 ** rng.uniform(-20, 20, size=shape)).astype(dtype)
    nb = np.broadcast_to(n, shape)
    valid = nb >= 2
    want = np.sum(np.where(valid, m2.astype(np.float64) / np.maximum(nb, 1), 0.0))
    assert hk.reduce(K.EB_COUNT, nb) == valid.sum()
    assert math.isclose(hk.reduce(K.EB_SUM, nb, m2), want, rel_tol=1e-12)


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_max", [None, 1.1])
def test_host_scale(hk: HostKernels, dtype: str, s_max: float | None) -> None:
    rng = np.random.default_rng(4)
    B = rng.uniform(0.0, 1.0, size=1001).astype(dtype)
    G = rng.normal(size=1001).astype(dtype)
    T = np.dtype(dtype).type
    mean_b = T(np.mean(B.astype(np.float64)))
    want_s = B / mean_b
    if s_max is not None:
        want_s = np.minimum(want_s, T(s_max))
    want_g = want_s * G
    clip = np.int32(s_max is not None)
    hk.elementwise(K.SCALE, mean_b, T(s_max or 0.0), clip, B, G)
    np.testing.assert_array_equal(B, want_s)
    np.testing.assert_array_equal(G, want_g)


# ---------------------------------------------------------------- host: the full pipeline


def host_full(
    hk: HostKernels,
    raw: list[tuple[Any, np.ndarray, np.ndarray]],
    lambdas: list[float],
    config: CalibrationConfig,
) -> dict[str, Any]:
    """``cupy_fused``'s full result on NumPy arrays: the same orchestration
    (``_cuda_kernels.full``), each kernel launched from the host build."""
    names = [str(k) for k in range(len(raw))]  # the names calibrate() gives a list of sources
    stats = [GradientStats(n, m, m2) for n, m, m2 in raw]
    tiny = float(np.finfo(raw[0][1].dtype).smallest_normal)
    G, Wt, U, Bs, E, zero_var = K.full(np, hk.reduce, hk.elementwise, names, stats, lambdas,
                                       config, tiny)
    return {"gradient": G, "weights": Wt, "uncertainty": U, "belief_scale": Bs, "evidence": E,
            "zero_variance_sources": zero_var}


def _raw(rng, S, shape, dtype, n=8.0, var_scale=1.0, per_dim=False, zeros=False):
    out = []
    for k in range(S):
        m = rng.normal(size=shape) * (k + 1) * rng.uniform(0.1, 3.0, size=shape)
        if zeros:
            m.reshape(-1)[k::3] = 0.0
        m2 = rng.gamma(1.5, size=shape) * var_scale * (k + 1) ** 2 * 7
        cnt: Any = np.asarray(n, dtype=dtype)
        if per_dim:
            cnt = rng.integers(2, 12, size=(shape[0], 1)).astype(dtype)
        out.append((cnt, m.astype(dtype), m2.astype(dtype)))
    return out


def check_against_reference(hk: HostKernels, raw, config: CalibrationConfig, lambdas=None):
    S = len(raw)
    lam = [1.0] * S if lambdas is None else list(lambdas)
    dtype = str(raw[0][1].dtype)
    stats = [GradientStats(n, m, m2) for n, m, m2 in raw]
    want = calibrate(stats, dataclasses.replace(config, fast_path="reference"), lambdas)
    got = host_full(hk, raw, lam, config)
    assert got["zero_variance_sources"] == want.flags["zero_variance_sources"]
    rtol, tiny = RTOL[dtype], np.finfo(dtype).tiny
    w = {f: np.asarray(getattr(want, f), dtype=np.float64) for f in FIELDS}
    for f in FIELDS:
        assert np.all(np.isfinite(got[f])), f
    for f in ("weights", "uncertainty", "belief_scale", "evidence"):
        np.testing.assert_allclose(got[f], w[f], rtol=rtol, atol=tiny, err_msg=f)
    # The gradient is a signed sum: bound its error by the sum of its terms' magnitudes.
    k0, mu0 = config.prior.kappa0, config.prior.mu0
    mus = np.stack(
        [
            np.broadcast_to((k0 * mu0 + n * m.astype(np.float64)) / (k0 + n) if k0 else m, m.shape)
            for n, m, _ in raw
        ]
    )
    lam_b = np.asarray(lam).reshape((S,) + (1,) * (mus.ndim - 1))
    scale = S * w["belief_scale"] * np.sum(w["weights"] * np.abs(lam_b * mus), axis=0)
    err = np.abs(got["gradient"] - w["gradient"])
    assert np.all(err <= 4 * rtol * scale + tiny), float(np.max(err / (scale + tiny)))


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", range(len(CONFIGS)))
@pytest.mark.parametrize("S", FUSE_S)
def test_host_full_matches_reference(hk: HostKernels, dtype: str, c: int, S: int) -> None:
    rng = np.random.default_rng(S)
    lambdas = [1.0 + 0.5 * k for k in range(S)]
    check_against_reference(hk, _raw(rng, S, (7, 37), dtype, zeros=True), CONFIGS[c], lambdas)


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", K.WEIGHTS)
@pytest.mark.parametrize("S", FUSE_S)
def test_host_full_per_dimension_counts(hk: HostKernels, dtype: str, weights: str, S: int) -> None:
    rng = np.random.default_rng(10 + S)
    raw = _raw(rng, S, (11, 29), dtype, per_dim=True, zeros=True)
    check_against_reference(hk, raw, CalibrationConfig(weights=weights))


EDGES = {
    "single-dimension": dict(shape=(1,)),
    "one-element-short-of-a-block": dict(shape=(127,)),
    "tiny-variances": dict(var_scale=1e-25),
    "huge-variances": dict(var_scale=1e25),
    "single-sample": dict(n=1.0, config=CalibrationConfig(prior=NormalGammaPrior(beta0=0.3))),
    "two-samples": dict(n=2.0),
    "zero-variance-source": dict(zero_var=True),
    "all-means-zero": dict(all_zero=True),
    "gamma-0": dict(config=CalibrationConfig(gamma=0.0)),
    "clip-and-prior-weight": dict(config=CalibrationConfig(clip=1.0, prior_weight=10.0)),
}


@pytest.mark.cuda_host
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(EDGES))
def test_host_full_edges(hk: HostKernels, dtype: str, case: str) -> None:
    opt = dict(EDGES[case])
    config = opt.pop("config", CalibrationConfig())
    shape = opt.pop("shape", (300,))
    zero_var, all_zero = opt.pop("zero_var", False), opt.pop("all_zero", False)
    rng = np.random.default_rng(5)
    raw = _raw(rng, 3, shape, dtype, zeros=shape[0] > 3, **opt)
    if zero_var:
        raw[1] = (raw[1][0], raw[1][1], np.zeros_like(raw[1][2]))
    if all_zero:
        raw[0] = (raw[0][0], np.zeros_like(raw[0][1]), raw[0][2])
    for weights in K.WEIGHTS:
        check_against_reference(hk, raw, dataclasses.replace(config, weights=weights))


@pytest.mark.cuda_host
def test_host_launch_shape_does_not_change_bits(hk: HostKernels) -> None:
    """Fewer threads than elements (grid-stride loop) and reversed threads: same bits."""
    rng = np.random.default_rng(6)
    raw = _raw(rng, 3, (1000,), "float32", zeros=True)
    config = CalibrationConfig(weights="dempster")
    base = host_full(hk, raw, [1.0, 2.0, 3.0], config)
    hk.block, hk.grid, hk.reverse = 32, 3, True
    again = host_full(hk, raw, [1.0, 2.0, 3.0], config)
    for f in FIELDS:
        np.testing.assert_array_equal(again[f], base[f], err_msg=f)


def test_cupy_fused_builds_its_kernels_from_these_sources(tmp_path: Path) -> None:
    """``cupy_fused`` hands CuPy exactly the sources checked here (a stand-in ``cupy``
    records the kernel objects it builds; run in a subprocess to keep it out of this one,
    from an empty folder so that the installed package is imported, not the source tree's
    ``bogc_core`` folder, which holds no ``backends``)."""
    code = textwrap.dedent(
        """
        import json, sys, types
        made = []
        cp = types.ModuleType("cupy")
        cp.ReductionKernel = lambda *a, **k: made.append(["reduction", list(a), k])
        cp.ElementwiseKernel = lambda *a, **k: made.append(["elementwise", list(a), k])
        sys.modules["cupy"], sys.modules["cupyx"] = cp, types.ModuleType("cupyx")
        from bogc_core.backends import cupy_fused
        for S in (1, 3):
            for w in ("evidence", "uniform", "dempster"):
                cupy_fused._elementwise(cupy_fused.cuda.fuse(S, w))
        print(json.dumps(made))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    want = []
    for k in (K.SCORE_SUM, K.SCORE_COUNT, K.EB_SUM, K.EB_COUNT):
        args = [k.in_params, k.out_params, k.map_expr, k.reduce_expr, k.post_map_expr]
        want.append(["reduction", [*args, k.identity, k.name], {"preamble": k.preamble}])
    fuses = [K.fuse(S, w) for S in (1, 3) for w in K.WEIGHTS]
    for k in [K.SCALE, *fuses]:
        args = [k.in_params, k.out_params, k.operation, k.name]
        want.append(["elementwise", args, {"preamble": k.preamble}])
    assert made == want


BARRIER_PROBE = r"""
#include "cuda_host.h"
__global__ void swap_with_barrier(int* out) {
    __shared__ int s[64];
    s[threadIdx.x] = (int)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void swap_without_barrier(int* out) {
    __shared__ int s[64];
    s[threadIdx.x] = (int)threadIdx.x;
    out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void barrier_in_branch(int* out) {
    if (threadIdx.x % 2) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" int run(int which, int reverse, int* out) {
    return bogc_host::launch(1, 64, reverse != 0, [&]() {
        if (which == 0) swap_with_barrier(out);
        if (which == 1) swap_without_barrier(out);
        if (which == 2) barrier_in_branch(out);
    });
}
"""


@pytest.mark.cuda_host
def test_host_header_keeps_barrier_semantics(gxx: str, tmp_path: Path) -> None:
    """The CPU emulation of a thread block: a barrier orders shared-memory writes before
    reads in either thread order, a missing one shows, a divergent one is reported."""
    src = tmp_path / "probe.cpp"
    src.write_text(BARRIER_PROBE)
    so = tmp_path / "probe.so"
    proc = subprocess.run(
        [gxx, *GXX_FLAGS, "-I", str(HEADERS), "-o", str(so), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(so))

    def run(which: int, reverse: bool) -> tuple[int, np.ndarray]:
        out = np.zeros(64, dtype=np.int32)
        rc = lib.run(which, int(reverse), out.ctypes.data_as(ctypes.POINTER(ctypes.c_int)))
        return rc, out

    want = np.arange(63, -1, -1, dtype=np.int32)
    for reverse in (False, True):
        rc, out = run(0, reverse)
        assert rc == 0
        np.testing.assert_array_equal(out, want)
    assert any(not np.array_equal(run(1, r)[1], want) for r in (False, True))
    assert run(2, False)[0] == 1


CUPY_SHIM_CHILD = """
import json, sys, types
import numpy as np
# NumPy standing in for CuPy (and np.add.at for cupyx.scatter_add): the engine's CuPy
# operations run on the host, so CupyShim's code is executed without a GPU
cp = types.ModuleType("cupy")
cp.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
cp.asnumpy = np.asarray
cp.ReductionKernel = cp.ElementwiseKernel = lambda *a, **k: None
cupyx = types.ModuleType("cupyx")
cupyx.scatter_add = np.add.at
sys.modules["cupy"], sys.modules["cupyx"] = cp, cupyx
from bogc_core.backends._gradient import gradient
from bogc_core.backends.cupy_fused import CupyShim
from bogc_core import CalibrationConfig, NormalGammaPrior
rng = np.random.default_rng(3)
D, S = 1000, 3
means = [rng.normal(size=D) * 10.0 ** rng.uniform(-3, 1) for _ in range(S)]
means[1][::7] = 0.0
m2s = [rng.random(D) * 4.0 for _ in range(S)]
per_dim = [np.full(D, 6.0), np.where(np.arange(D) % 5 == 1, 1.0, 8.0), np.full(D, 3.0)]
res = {}
for case, config, counts in [
    ("default", CalibrationConfig(), [8.0, 8.0, 8.0]),
    ("kappa_dempster", CalibrationConfig(weights="dempster", prior=NormalGammaPrior(kappa0=2.0)),
     [5.0, 9.0, 3.0]),
    ("per_dim_smax", CalibrationConfig(s_max=1.5, evidence_from="precision"), per_dim),
]:
    out = np.empty(D)
    gradient(CupyShim(), ["a", "b", "c"], means, m2s, counts, [1.0, 0.5, 2.0], config, out,
             [300, 1, 699], 256, float(np.finfo(np.float64).tiny), False)
    res[case] = out.tolist()
print(json.dumps(res))
"""


def test_cupy_shim_runs_the_engine_as_the_reference(tmp_path: Path) -> None:
    """The engine's CuPy shim (``cupy_fused.CupyShim``), run on NumPy standing in for CuPy,
    gives ``calibrate(...).gradient`` of every segment (blocks that cross segments, a zero
    mean every 7th dimension, per-dimension counts below 2): the shim's own operations
    (``segsum`` by ``scatter_add``, ``expand`` by an index, ``to_host``) and the engine's
    branches for a library other than NumPy, without a GPU."""
    proc = subprocess.run([sys.executable, "-c", CUPY_SHIM_CHILD], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    rng = np.random.default_rng(3)
    D, S = 1000, 3
    means = [rng.normal(size=D) * 10.0 ** rng.uniform(-3, 1) for _ in range(S)]
    means[1][::7] = 0.0
    m2s = [rng.random(D) * 4.0 for _ in range(S)]
    per_dim = [np.full(D, 6.0), np.where(np.arange(D) % 5 == 1, 1.0, 8.0), np.full(D, 3.0)]
    cases = {
        "default": (CalibrationConfig(), [8.0, 8.0, 8.0]),
        "kappa_dempster": (CalibrationConfig(weights="dempster", prior=NormalGammaPrior(kappa0=2.0)),
                           [5.0, 9.0, 3.0]),
        "per_dim_smax": (CalibrationConfig(s_max=1.5, evidence_from="precision"), per_dim),
    }
    for case, (config, counts) in cases.items():
        want = np.empty(D)
        for a, b in [(0, 300), (300, 301), (301, D)]:
            stats = {k: GradientStats(count=np.asarray(counts[i]) if isinstance(counts[i], float)
                                      else counts[i][a:b], mean=means[i][a:b], m2=m2s[i][a:b])
                     for i, k in enumerate("abc")}
            ref = dataclasses.replace(config, fast_path="reference")
            want[a:b] = calibrate(stats, ref, {"a": 1.0, "b": 0.5, "c": 2.0}).gradient
        np.testing.assert_allclose(np.asarray(got[case]), want, rtol=1e-10, atol=0, err_msg=case)
