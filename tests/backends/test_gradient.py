"""Every fast path's ``calibrate_gradient`` equals the reference, segment by segment.

The reference is ``calibrate`` forced onto the reference, run on each segment
on its own, concatenated: ``segments`` must make each segment its own group
(own prior, evidence reference and belief-scale mean). The error bound of the
signed gradient is relative to the sum of its terms' magnitudes, recomputed
from the reference's weights and belief scale.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bogc_core import (
    BOGCError,
    CalibrationConfig,
    GradientStats,
    NormalGammaPrior,
    calibrate,
    calibrate_gradient,
)
from bogc_core._namespace import resolve
from bogc_core._types import Decline

from .conftest import RTOL, _cuda_torch, _cupy, _torch_cpu, float64_numpy, lib_array


@dataclass
class Path:
    """One fast path's ``calibrate_gradient``, and how to move NumPy data onto it."""

    module: str
    lib: str
    device: str = "cpu"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Whether the compiled (numba) loops may run; False: the array engine.
    numba: bool = False

    def mod(self) -> Any:
        return importlib.import_module(f"bogc_core.backends.{self.module}")

    def asarray(self, x: Any, dtype: str) -> Any:
        return lib_array(self.lib, self.device, x, dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return float64_numpy(self.lib, x)

    def run(self, stats, lambdas, config, **kw):
        from bogc_core.backends import _numba_kernel

        space = resolve(*[s.mean for s in stats])
        names = [f"s{k}" for k in range(len(stats))]
        lambdas = [1.0] * len(stats) if lambdas is None else [float(v) for v in lambdas]
        saved = _numba_kernel.ENABLED[0]
        _numba_kernel.ENABLED[0] = self.numba
        try:
            return self.mod().calibrate_gradient(space, names, stats, lambdas, config, **kw, **self.kwargs)
        finally:
            _numba_kernel.ENABLED[0] = saved


def _numba() -> str | None:
    from bogc_core.backends import _numba_kernel

    return None if _numba_kernel.AVAILABLE else "numba not installed (it comes with the torch extra, or [fast])"


def _paths() -> list[Any]:
    out = []
    for path, why in [
        (Path("numpy_fused", "numpy"), None),
        (Path("torch_fused", "torch"), _torch_cpu()),
        (Path("numpy_fused", "numpy", numba=True), _numba()),
        (Path("torch_fused", "torch", numba=True), _torch_cpu() or _numba()),
        # The tensor engine (CUDA's code path), run on the CPU.
        (Path("torch_fused", "torch", kwargs={"native": True}), _torch_cpu()),
        (Path("torch_fused", "torch", "cuda"), _cuda_torch()),
        (Path("cupy_fused", "cupy", "cuda"), _cupy()),
    ]:
        marks = [pytest.mark.skip(reason=why)] if why else []
        ident = f"{path.module}-{path.device}" + ("-native" if path.kwargs else "")
        ident += "-numba" if path.numba else ""
        out.append(pytest.param(path, marks=marks, id=ident))
    return out


@pytest.fixture(params=_paths())
def path(request: Any) -> Path:
    return request.param


def make(path: Path, dtype: str, raw: list[tuple]) -> list[GradientStats]:
    return [
        GradientStats(path.asarray(n, dtype), path.asarray(m, dtype), path.asarray(v, dtype))
        for n, m, v in raw
    ]


def random_raw(rng, S, D, per_dim=False, zero_frac=0.2, scale=1.0):
    raw = []
    for k in range(S):
        m = rng.normal(size=D) * scale * (k + 1) * rng.uniform(0.1, 3.0, size=D)
        m[rng.random(D) < zero_frac] = 0.0  # dead units: exactly-zero means
        n = rng.integers(2, 9, size=D).astype(float) if per_dim else 8.0
        m2 = rng.gamma(1.5, size=D) * scale**2 * (k + 1) ** 2 * 7
        raw.append((n, m, m2))
    return raw


def _seg_stats(stats, a, b):
    return [
        GradientStats(s.count if len(s.count.shape) == 0 else s.count[a:b], s.mean[a:b], s.m2[a:b])
        for s in stats
    ]


def reference_config(config: CalibrationConfig) -> CalibrationConfig:
    """``config`` forced onto the reference (option ``fast_path``, formerly ``backend``)."""
    names = {f.name for f in dataclasses.fields(config)}
    key = "fast_path" if "fast_path" in names else "backend"
    return dataclasses.replace(config, **{key: "reference"})


def reference(path, stats, lambdas, config, segments):
    """Concatenated per-segment reference gradient and its per-dimension error scale."""
    D = stats[0].shape[0]
    lengths = [D] if segments is None else list(segments)
    grads, scales = [], []
    a = 0
    ref_cfg = reference_config(config)
    for n in lengths:
        seg = _seg_stats(stats, a, a + n)
        cal = calibrate(seg, ref_cfg, lambdas)
        grads.append(path.to_numpy(cal.gradient))
        w = path.to_numpy(cal.weights)
        s = path.to_numpy(cal.belief_scale)
        k0, mu0 = config.prior.kappa0, config.prior.mu0
        mus = []
        for st_ in seg:
            m = path.to_numpy(st_.mean)
            cnt = path.to_numpy(st_.count)
            mus.append((k0 * mu0 + cnt * m) / (k0 + cnt) if k0 else m)
        lam = np.ones(len(seg)) if lambdas is None else np.asarray(lambdas, dtype=float)
        terms = np.abs(w * lam[:, None] * np.stack(mus))
        scales.append(len(seg) * np.abs(s) * terms.sum(axis=0))
        a += n
    return np.concatenate(grads), np.concatenate(scales)


def check(path, dtype, raw, config, segments=None, lambdas=None):
    stats = make(path, dtype, raw)
    want, scale = reference(path, stats, lambdas, config, segments)
    before = [path.to_numpy(s.mean).copy() for s in stats]
    diag: dict[str, Any] = {}
    got = path.to_numpy(path.run(stats, lambdas, config, segments=segments, diagnostics=diag))
    assert diag["path"] == path.mod().NAME
    for b, s in zip(before, stats):
        np.testing.assert_array_equal(path.to_numpy(s.mean), b)  # inputs untouched
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    rtol = RTOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale.max() * 1e-3 + 1e-30)
    err = np.abs(got - want)
    assert np.all(err <= rtol * (scale + np.abs(want)) + np.finfo(dtype).tiny)


CONFIGS = {
    "default": CalibrationConfig(),
    "gamma1": CalibrationConfig(gamma=1.0),
    "gamma025": CalibrationConfig(gamma=0.25),
    "gamma2": CalibrationConfig(gamma=2.0),
    "gamma_general": CalibrationConfig(gamma=0.37),
    "gamma0": CalibrationConfig(gamma=0.0),
    "precision": CalibrationConfig(evidence_from="precision"),
    "precision_g1": CalibrationConfig(evidence_from="precision", gamma=1.0),
    "dempster": CalibrationConfig(weights="dempster"),
    "uniform": CalibrationConfig(weights="uniform"),
    "scale_none": CalibrationConfig(scale="none"),
    "s_max": CalibrationConfig(s_max=1.1),
    "kappa0": CalibrationConfig(prior=NormalGammaPrior(kappa0=2.0, mu0=0.3, alpha0=2.0)),
    "beta0": CalibrationConfig(prior=NormalGammaPrior(beta0=0.7)),
    "W_clip": CalibrationConfig(prior_weight=3.0, clip=2.0),
    "dempster_W": CalibrationConfig(weights="dempster", prior_weight=0.5, s_max=2.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("per_dim", [False, True])
def test_every_option_with_segments(path, dtype, name, S, per_dim):
    rng = np.random.default_rng(hash((name, S, per_dim)) % 2**32)
    segments = [7, 1, 30, 2, 20]
    raw = random_raw(rng, S, sum(segments), per_dim=per_dim)
    check(path, dtype, raw, CONFIGS[name], segments=segments, lambdas=[1.5, 0.5, 2.0][:S])


@pytest.mark.parametrize("name", ["default", "gamma_general", "dempster", "s_max"])
def test_one_group_and_blocks_across_segments(path, dtype, name, monkeypatch):
    """Blocks smaller than segments, and segments that straddle block boundaries."""
    from bogc_core.backends import _adapter

    monkeypatch.setitem(_adapter.BLOCK, "cpu", 16)
    rng = np.random.default_rng(1)
    raw = random_raw(rng, 3, 101)
    check(path, dtype, raw, CONFIGS[name])
    check(path, dtype, raw, CONFIGS[name], segments=[5, 40, 3, 1, 52])


def test_zero_variance_and_all_zero_segments(path, dtype):
    """A source with M2 = 0 in one segment gives that segment equal evidence; a
    segment whose means are all zero gets the clip-floor evidence everywhere."""
    rng = np.random.default_rng(2)
    raw = random_raw(rng, 3, 30, zero_frac=0.0)
    n, m, m2 = raw[1]
    m2 = m2.copy()
    m2[10:20] = 0.0
    raw[1] = (n, m, m2)
    for k in range(3):
        mk = raw[k][1].copy()
        mk[20:30] = 0.0
        raw[k] = (raw[k][0], mk, raw[k][2])
    check(path, dtype, raw, CalibrationConfig(), segments=[10, 10, 10])
    stats = make(path, dtype, raw)
    diag: dict[str, Any] = {}
    path.run(stats, None, CalibrationConfig(), segments=[10, 10, 10], diagnostics=diag)
    assert diag["zero_variance_sources"] == ["s1"]


def test_out_is_written_and_returned(path, dtype):
    rng = np.random.default_rng(3)
    raw = random_raw(rng, 2, 12)
    stats = make(path, dtype, raw)
    want = path.to_numpy(path.run(stats, None, CalibrationConfig(), segments=[5, 7]))
    out = path.asarray(np.full(12, 7.0), dtype)
    got = path.run(stats, None, CalibrationConfig(), out=out, segments=[5, 7])
    assert got is out
    np.testing.assert_array_equal(path.to_numpy(out), want)
    # A strided (non-contiguous) out.
    big = path.asarray(np.full(24, 7.0), dtype)
    view = big[::2]
    assert path.run(stats, None, CalibrationConfig(), out=view, segments=[5, 7]) is view
    np.testing.assert_array_equal(path.to_numpy(big)[::2], want)
    np.testing.assert_array_equal(path.to_numpy(big)[1::2], 7.0)


def test_out_untouched_on_error(path):
    rng = np.random.default_rng(4)
    stats = make(path, "float64", random_raw(rng, 2, 6))
    out = path.asarray(np.full(6, 3.0), "float64")
    from bogc_core.errors import BOGCError

    with pytest.raises(BOGCError, match="segments"):
        path.run(stats, None, CalibrationConfig(), out=out, segments=[2, 2])
    one = [GradientStats(path.asarray(1.0, "float64"), s.mean, s.m2) for s in stats]
    with pytest.raises(Decline, match="fewer than 2 samples"):
        path.run(one, None, CalibrationConfig(), out=out)
    np.testing.assert_array_equal(path.to_numpy(out), 3.0)


def test_multidimensional_without_segments(path, dtype):
    rng = np.random.default_rng(5)
    raw = [(n, m.reshape(4, 6), v.reshape(4, 6)) for n, m, v in random_raw(rng, 3, 24)]
    stats = make(path, dtype, raw)
    cal = calibrate(stats, reference_config(CalibrationConfig()))
    got = path.run(stats, None, CalibrationConfig())
    assert tuple(got.shape) == (4, 6)
    np.testing.assert_allclose(path.to_numpy(got), path.to_numpy(cal.gradient), rtol=RTOL[dtype] * 10, atol=1e-5)


def test_declines_float16(path):
    if path.lib == "cupy":
        pytest.skip("float16 statistics are refused before any CuPy kernel (same check)")
    stats = make(path, "float16", random_raw(np.random.default_rng(6), 2, 4))
    with pytest.raises(Decline, match="dtype"):
        path.run(stats, None, CalibrationConfig())


_MAG = st.sampled_from([0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e12, 1e30])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mags=st.lists(st.tuples(_MAG, _MAG), min_size=2, max_size=3),
    gamma=st.sampled_from([0.5, 1.0, 0.37, 1e-30, 1e39]),
    W=st.sampled_from([1.0, 1e-3, 1e300]),
    clip=st.sampled_from([13.8, 1.0, float("inf")]),
    dead=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adversarial_magnitudes(path, dtype, mags, gamma, W, clip, dead, seed):
    """Means and variances from 1e-30 to 1e30 and zeros, huge gamma and prior
    weight, infinite clip: the fast path gives the reference's gradient, or
    declines (the reference then runs) where the reference is not finite."""
    rng = np.random.default_rng(seed)
    D = 9
    raw = []
    for sm, sv in mags:
        m = rng.normal(size=D) * sm
        if dead:
            m[:3] = 0.0  # an all-zero-mean dimension block
        raw.append((6.0, m, rng.gamma(1.5, size=D) * sv + (sv if sv else 1.0)))
    config = CalibrationConfig(gamma=gamma, prior_weight=W, clip=clip)
    stats = make(path, dtype, raw)
    try:
        want, scale = reference(path, stats, None, config, [4, 5])
    except BOGCError as exc:
        # The reference refuses the option for this dtype (a clip beyond its
        # range, say): the public call refuses it before any fast path runs.
        with pytest.raises(type(exc)):
            calibrate_gradient(stats, config, segments=[4, 5])
        return
    try:
        got = path.to_numpy(path.run(stats, None, config, segments=[4, 5]))
    except Decline:
        assert not np.all(np.isfinite(want)), "declined although the reference is finite"
        return
    ok = np.isfinite(want)
    assert np.all(np.isfinite(got[ok]))
    rtol = RTOL[dtype] * 10
    if gamma > 1e30:
        # gamma * (l - ref) turns a rounding difference in l into a step of
        # the clip size: the map is discontinuous at the ulp level, so two
        # correct implementations agree only to a few parts in 1e6.
        rtol = max(rtol, 1e-4)
    err = np.abs(got - want)[ok]
    assert np.all(err <= rtol * (scale[ok] + np.abs(want[ok])) + np.finfo(dtype).tiny)


def test_zero_means_take_no_slow_path(path, dtype, monkeypatch):
    """Dead units (exactly-zero means) are handled in the one-log form: the
    reference's two-log form is never entered for them."""
    from bogc_core.backends import _gradient

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("two-log form entered for zero means")

    monkeypatch.setattr(_gradient, "_score_sums_two_logs", refuse)
    rng = np.random.default_rng(7)
    check(path, dtype, random_raw(rng, 3, 64, zero_frac=0.4), CalibrationConfig(), segments=[20, 44])


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_blocks(dtype, threads, monkeypatch):
    """Passes B and C on several threads (contiguous runs of blocks, partial
    sums per thread) give the reference's gradient."""
    from bogc_core.backends import _adapter, numpy_fused

    monkeypatch.setitem(_adapter.BLOCK, "cpu", 16)
    numpy_fused.set_threads(threads)
    try:
        rng = np.random.default_rng(9)
        check(Path("numpy_fused", "numpy"), dtype, random_raw(rng, 3, 200), CalibrationConfig(),
              segments=[50, 3, 97, 50])
        check(Path("numpy_fused", "numpy"), dtype, random_raw(rng, 2, 150), CONFIGS["s_max"])
    finally:
        numpy_fused.set_threads(1)


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
@pytest.mark.parametrize("name", ["default", "gamma1", "gamma025", "gamma2", "uniform", "scale_none", "beta0"])
@pytest.mark.parametrize("segments", [None, [2500, 1, 2048, 2049, 7]])
def test_numba_loops_taken_and_equal(name, segments):
    """float32, one count: the compiled loops run (segments longer than their
    blocks) and agree with the reference and with the array engine."""
    from bogc_core.backends import _numba_kernel

    path = Path("numpy_fused", "numpy", numba=True)
    rng = np.random.default_rng(7)
    D = 6605 if segments is None else sum(segments)
    raw = random_raw(rng, 3, D)
    check(path, "float32", raw, CONFIGS[name], segments=segments, lambdas=[1.5, 0.5, 2.0])
    stats = make(path, "float32", raw)
    diag: dict[str, Any] = {}
    got = path.to_numpy(path.run(stats, None, CONFIGS[name], segments=segments, diagnostics=diag))
    assert diag["kernel"] == "numba"
    engine = Path("numpy_fused", "numpy", numba=False)
    diag2: dict[str, Any] = {}
    want = engine.to_numpy(engine.run(stats, None, CONFIGS[name], segments=segments, diagnostics=diag2))
    assert "kernel" not in diag2
    assert diag["zero_variance_sources"] == diag2["zero_variance_sources"]
    # Sums of means of either sign cancel: an absolute share of the largest value.
    rtol = RTOL["float32"]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-3 * float(np.abs(want).max()))
    assert _numba_kernel.ENABLED[0] == _numba_kernel.AVAILABLE


def _numba_pool() -> str | None:
    if _numba() is not None:
        return _numba()
    import numba

    if int(numba.config.NUMBA_NUM_THREADS) < 2:
        return "numba's thread pool has one thread on this machine"
    return None


@pytest.mark.skipif(_numba_pool() is not None, reason=str(_numba_pool()))
@pytest.mark.parametrize("segments", [None, "items"])
def test_numba_threads_bit_identical(segments):
    """1 and 2 threads give the same bits (NumPy through numpy_fused.set_threads, torch
    through torch.set_num_threads): the partial sums of the fixed work items are reduced
    in item order, whatever thread ran them."""
    from bogc_core.backends import _numba_kernel, numpy_fused

    item = _numba_kernel._ITEM
    # Segments that end inside, at and across work items; more items than threads.
    segs = None if segments is None else [item + 5, 3, item, 2 * item + 1, 17]
    D = 4 * item + 77 if segs is None else sum(segs)
    rng = np.random.default_rng(11)
    raw = random_raw(rng, 3, D)
    lambdas = [1.5, 0.5, 2.0]
    path = Path("numpy_fused", "numpy", numba=True)
    stats = make(path, "float32", raw)
    got = {}
    try:
        for n in (1, 2, 1):
            numpy_fused.set_threads(n)
            diag: dict[str, Any] = {}
            got[n] = path.to_numpy(path.run(stats, lambdas, CalibrationConfig(), segments=segs, diagnostics=diag)).copy()
            assert diag["kernel"] == "numba"
    finally:
        numpy_fused.set_threads(1)
    assert got[1].view(np.uint32).tolist() == got[2].view(np.uint32).tolist()
    check(path, "float32", raw, CalibrationConfig(), segments=segs, lambdas=lambdas)
    if _torch_cpu() is None:
        import torch

        tpath = Path("torch_fused", "torch", numba=True)
        tstats = make(tpath, "float32", raw)
        t_saved = torch.get_num_threads()
        tgot = {}
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                tgot[n] = tpath.to_numpy(tpath.run(tstats, lambdas, CalibrationConfig(), segments=segs)).copy()
        finally:
            torch.set_num_threads(t_saved)
        assert tgot[1].view(np.uint32).tolist() == tgot[2].view(np.uint32).tolist()
        assert tgot[1].view(np.uint32).tolist() == got[1].view(np.uint32).tolist()


def test_set_threads_rejects_bad_counts():
    from bogc_core.backends import numpy_fused

    from bogc_core import BOGCError

    for bad in (0, -1, 1.5, "2", None):
        with pytest.raises(BOGCError, match="n: must be an int >= 1"):
            numpy_fused.set_threads(bad)  # type: ignore[arg-type]
    assert numpy_fused._THREADS == [1]


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
def test_numba_one_thread_runs_the_serial_loops(monkeypatch):
    """One thread never enters a parallel region (numba's pool would start, and its idle
    workers spin after each region, taking a core from the caller); two threads do."""
    from bogc_core.backends import _numba_kernel as nk
    from bogc_core.backends import numpy_fused

    def refuse(*a):
        raise AssertionError("a parallel loop ran")

    rng = np.random.default_rng(5)
    raw = random_raw(rng, 2, 3 * nk._ITEM + 11)
    path = Path("numpy_fused", "numpy", numba=True)
    stats = make(path, "float32", raw)
    try:
        numpy_fused.set_threads(1)
        with monkeypatch.context() as mp:
            mp.setattr(nk, "_PARALLEL", nk._Loops(refuse, refuse, refuse, refuse))
            diag: dict[str, Any] = {}
            one = path.to_numpy(path.run(stats, [1.0, 1.0], CalibrationConfig(), diagnostics=diag))
            assert diag["kernel"] == "numba"
        numpy_fused.set_threads(2)
        with monkeypatch.context() as mp:
            mp.setattr(nk, "_SERIAL", nk._Loops(refuse, refuse, refuse, refuse))
            two = path.to_numpy(path.run(stats, [1.0, 1.0], CalibrationConfig()))
    finally:
        numpy_fused.set_threads(1)
    assert one.view(np.uint32).tolist() == two.view(np.uint32).tolist()


ONE_THREAD_CHILD = """
import sys
import numba.np.ufunc.parallel as pool, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from bogc_core import GradientStats, calibrate_gradient
rng = np.random.default_rng(0)
st = {k: GradientStats(count=4.0, mean=torch.from_numpy(rng.normal(size=70000).astype(np.float32)),
                       m2=torch.from_numpy(rng.random(70000).astype(np.float32))) for k in "ab"}
for _ in range(2):  # the first call may compile and store; the second loads from the cache
    d = {}
    calibrate_gradient(st, diagnostics=d)
    assert d.get("kernel") == "numba", d
print(torch.get_num_threads(), bool(pool._is_initialized))
"""


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
def test_numba_one_thread_starts_no_pool_in_a_fresh_process(tmp_path):
    """With torch at one thread, a calibration in a new process (the compiled loops loaded
    from numba's on-disk cache, as every later process does) starts no thread pool and
    leaves torch's thread count alone: numba's OpenMP pool shares torch's runtime, and
    its start would set torch to numba's thread count. An empty cache first receives the
    parallel compilation (a two-thread process), which the serial loops must not load."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_NUM_THREADS="2")
    got = []
    for threads in ("2", "1", "1"):
        proc = subprocess.run([sys.executable, "-c", ONE_THREAD_CHILD, threads],
                              capture_output=True, text=True, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        got.append(proc.stdout.split())
    assert got[0] == ["2", "True"]  # the parallel loops ran (and were cached)
    assert got[1] == got[2] == ["1", "False"]


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
@pytest.mark.parametrize("compiled", ["_PARALLEL", "_SERIAL"])
@pytest.mark.parametrize("mag", [1e-20, 1e-30, 3e19])
def test_numba_log_sums_square_and_fallback_blocks(mag, compiled):
    """Pass B's sum of log r per item against float64 logs taken one by one:
    blocks whose m^2 under- or overflows (|m| = mag) are taken again from r,
    the others from r^2 = m^2 / beta; zero means are counted and left out."""
    from bogc_core.backends import _numba_kernel as nk

    rng = np.random.default_rng(3)
    D = 3 * nk._BL_B + 500
    m = (rng.normal(size=D) * rng.uniform(0.1, 3.0, size=D)).astype(np.float32)
    m[rng.random(D) < 0.2] = 0.0
    m[nk._BL_B + 10 : nk._BL_B + 40] = np.float32(mag)  # one block needs the fallback
    m2 = (rng.gamma(1.5, size=D) * 7).astype(np.float32)
    b0 = np.asarray([0.7], dtype=np.float32)
    tiny = np.float32(np.finfo(np.float32).smallest_normal)
    istart = np.asarray([0, 1700], dtype=np.int64)
    iend = np.asarray([1700, D], dtype=np.int64)
    iseg = np.asarray([0, 0], dtype=np.int64)
    part = np.empty(2)
    nzp = np.empty(2, dtype=np.int64)
    badp = np.empty(2, dtype=np.int64)
    invp = np.empty(2, dtype=np.int64)
    getattr(nk, compiled).log_sums(m, m2, b0, tiny, istart, iend, iseg, part, nzp, badp, invp)
    assert not invp.any()  # the folded values check finds nothing wrong
    beta = np.maximum(m2 * np.float32(0.5) + b0[0], tiny).astype(np.float64)
    for i in range(2):
        a, b = istart[i], iend[i]
        mm = m[a:b].astype(np.float64)
        nzmask = mm != 0
        want = np.sum(np.log(np.abs(mm[nzmask]) / np.sqrt(beta[a:b][nzmask])))
        assert nzp[i] == int(np.sum(~nzmask))
        assert badp[i] == 0
        # float32 ratios: a relative error of ~1e-7 per term, summed.
        assert abs(part[i] - want) <= 1e-6 * np.sum(np.abs(np.log(np.abs(mm[nzmask])))) + 1e-3
    # The whole path agrees with the reference and takes the compiled loops.
    raw = random_raw(rng, 2, D)
    raw[0][1][nk._BL_B + 10 : nk._BL_B + 40] = mag
    path = Path("numpy_fused", "numpy", numba=True)
    check(path, "float32", raw, CalibrationConfig())
    diag: dict[str, Any] = {}
    path.run(make(path, "float32", raw), None, CalibrationConfig(), diagnostics=diag)
    assert diag["kernel"] == "numba"


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
@settings(max_examples=40, deadline=None)
@given(C=st.integers(2, 6), n=st.integers(1, 300), f64=st.booleans(),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e15]), seed=st.integers(0, 2**16))
def test_chunk_moments_two_pass_closed_form(C, n, f64, scale, seed):
    """The compiled moments of equal micro-batches against the two-pass formulas in
    float64: ``mean = mean_j (inv x_j)``, ``M2 = sum_j (inv x_j - mean)^2`` (the squares of
    samples near 1e-30 underflow in float32, as any float32 M2 does: an absolute
    ``C tiny`` more)."""
    torch = pytest.importorskip("torch")
    from bogc_core.backends.torch_fused import chunk_moments

    dt = np.float64 if f64 else np.float32
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((C, n)) * scale + rng.standard_normal(n) * scale * 3).astype(dt)
    inv = float(rng.uniform(0.01, 2.0))
    mean, m2 = np.full(n, np.nan, dtype=dt), np.full(n, np.nan, dtype=dt)
    assert chunk_moments(torch.from_numpy(x), inv, torch.from_numpy(mean), torch.from_numpy(m2))
    s = x.astype(np.float64) * inv
    want_mean = s.mean(axis=0)
    want_m2 = ((s - want_mean) ** 2).sum(axis=0)
    eps, tiny = float(np.finfo(dt).eps), float(np.finfo(dt).smallest_normal)
    mag = np.abs(s).max(axis=0)
    np.testing.assert_array_less(np.abs(mean - want_mean), 4 * C * eps * mag + tiny)
    # M2's error follows the mean's, times the spread: relative to mag^2.
    np.testing.assert_array_less(np.abs(m2 - want_m2), 16 * C * C * eps * mag * mag + 2 * C * tiny)
    assert np.all(m2 >= 0)


@pytest.mark.skipif(_numba() is not None, reason=str(_numba()))
def test_chunk_moments_declines_what_it_cannot_take(monkeypatch):
    """Mixed dtypes, strided tensors, float16, or the compiled loops switched off: ``False``,
    and nothing written."""
    torch = pytest.importorskip("torch")
    from bogc_core.backends import _numba_kernel
    from bogc_core.backends.torch_fused import chunk_moments

    g = torch.ones((3, 8, 2))
    for gg, mean, m2 in [
        (g[:, :, 0], torch.zeros(8), torch.zeros(8)),  # strided samples
        (g[:, :, 0].contiguous(), torch.zeros(16)[::2], torch.zeros(8)),  # strided output
        (g[:, :, 0].contiguous(), torch.zeros(8, dtype=torch.float64), torch.zeros(8)),
        (g[:, :, 0].half(), torch.zeros(8).half(), torch.zeros(8).half()),
    ]:
        assert not chunk_moments(gg, 1.0, mean, m2)
        assert not mean.any() and not m2.any()
    mean, m2 = torch.zeros(8), torch.zeros(8)
    monkeypatch.setattr(_numba_kernel, "ENABLED", [False])
    assert not chunk_moments(g[:, :, 0].contiguous(), 0.5, mean, m2)
    monkeypatch.setattr(_numba_kernel, "ENABLED", [True])
    assert chunk_moments(g[:, :, 0].contiguous(), 0.5, mean, m2)
    assert torch.equal(mean, torch.full((8,), 0.5)) and torch.equal(m2, torch.zeros(8))
