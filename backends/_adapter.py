"""One adapter per array library, and the one :func:`run` that every fast path calls.

An adapter is a name, an ``accepts`` test and the engine's operations for its
library (:meth:`Adapter.engine`); the checks of a call (dtype, ``out``,
``segments``), the allocation of the outputs and the call of the engine
(:mod:`._gradient`) are written here once. A fast-path module binds its
adapter's :meth:`~Adapter.calibrate` and :meth:`~Adapter.calibrate_gradient`
as the protocol functions (``backends/__init__.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bogc_core._diagnostics import Reductions, from_reductions
from bogc_core._inputs import check_stats
from bogc_core._types import Calibration, CalibrationConfig, Decline
from bogc_core.errors import DTypeError, ShapeError

from ._gradient import Outputs, Shim, Summary, gradient

__all__ = ["Adapter", "BLOCK", "identity", "run", "check_call", "decline_reason", "evidence_range_problem",
           "hugepage_buffer"]

#: Engine block length (elements) on the CPU: ~10 float64 temporaries of a
#: block stay in L2. On an accelerator the engine takes the whole array per call.
BLOCK = {"cpu": 1 << 15}


def identity(x: Any) -> Any:
    """The view of an array library whose arrays the engine takes as they are."""
    return x


def evidence_range_problem(config: CalibrationConfig, tiny: float, big: float) -> str | None:
    """Why the outputs' dtype cannot hold this config's evidence, or None.

    ``e`` lies in ``[exp(-clip), exp(clip)]``; the fused belief divides it by
    ``W``, which needs ``e/W`` to stay a positive finite number of the dtype.
    (The reference itself yields infinite evidence or NaN weights beyond it.)
    """
    L, W = float(config.clip), float(config.prior_weight)
    try:
        hi = math.exp(L)
        lo = math.exp(-L)
    except OverflowError:
        return f"clip={L} makes exp(clip) overflow"
    if not (hi < big and hi / W < big and lo / W >= tiny and lo >= tiny):
        return (
            f"clip={L} with prior_weight={W} puts evidence/prior_weight outside the dtype's "
            f"normal range"
        )
    return None


def decline_reason(space: Any, stats: Sequence[Any], config: CalibrationConfig | None) -> str | None:
    """Why no fast path can take this call (the reference runs instead), or None.

    A dtype other than float32/float64, statistics that require grad (the
    fast paths write into buffers, outside autograd), an empty parameter, or
    (with a ``config``: the full result, whose evidence is stored in the
    input dtype) evidence the dtype cannot represent.
    """
    dtype_name = str(space.dtype).rsplit(".", 1)[-1]
    if dtype_name not in ("float32", "float64"):
        return f"dtype {space.dtype} (the fast paths support float32 and float64)"
    for s in stats:
        if any(getattr(t, "requires_grad", False) for t in (s.count, s.mean, s.m2)):
            return "statistics require grad (the fast path writes into buffers, outside autograd)"
    if math.prod(stats[0].shape) == 0:
        return "empty parameter (no dimensions)"
    if config is None:
        return None
    return evidence_range_problem(config, space.tiny, space.max)


def check_call(stats: Sequence[Any], segments: Sequence[int] | None,
               out: Any) -> tuple[tuple[int, ...], int]:
    """The checks of ``segments`` and ``out``; returns ``(shape, D)``."""
    shape = tuple(int(v) for v in stats[0].shape)
    D = math.prod(shape)
    if segments is not None:
        if len(shape) != 1:
            raise ShapeError(
                f"segments: given, so the statistics must be one-dimensional (D,); got shape "
                f"{shape}; flatten them, or pass segments=None"
            )
        lengths = [int(n) for n in segments]
        if not lengths or any(n < 1 for n in lengths) or sum(lengths) != D:
            raise ShapeError(f"segments: must be positive lengths summing to D={D}; got {lengths}")
    if out is not None:
        if tuple(out.shape) != shape:
            raise ShapeError(f"out: shape {tuple(out.shape)} does not match the statistics' {shape}")
        if out.dtype != stats[0].mean.dtype:
            raise DTypeError(
                f"out: dtype {out.dtype} differs from the statistics' {stats[0].mean.dtype}; "
                f"pass an output of the same dtype"
            )
    return shape, D


def _flat_count(xp: Any, count: Any, shape: tuple[int, ...]) -> Any:
    """A Python float (one count) or the flat per-dimension counts."""
    if math.prod(tuple(count.shape)) == 1:
        return float(count if len(tuple(count.shape)) == 0 else xp.reshape(count, (-1,))[0])
    return xp.reshape(xp.broadcast_to(count, shape), (-1,))


def run(adapter: Adapter, space: Any, names: Sequence[str], stats: Sequence[Any],
        lambdas: Sequence[float], config: CalibrationConfig, *, out: Any = None,
        segments: Sequence[int] | None = None, diagnostics: dict[str, Any] | None = None,
        full: bool = False, native: bool = False, summarize: bool | Sequence[int] = False,
        check_values: bool = False) -> Any:
    """The engine on one call: the gradient (into ``out`` when given), or with
    ``full`` the whole :class:`Calibration`. Raises :class:`Decline` to decline.

    ``summarize`` (with a ``diagnostics`` dict): ``True`` puts under
    ``diagnostics["segments"]`` one dict per segment, the keys of
    :attr:`Calibration.diagnostics`, from reductions the passes accumulate;
    a sequence of lengths refining ``segments`` gives one dict per such part.

    ``check_values``: the caller left the values check of the statistics to
    this call (the compiled loops fold it into their passes; otherwise it runs
    before the engine), and ``diagnostics["finite"]`` is set to whether the
    written gradient was verified finite."""
    problem = decline_reason(space, stats, config if full else None)
    if problem:
        raise Decline(problem)
    if full and adapter.kernels is not None:
        return adapter.kernels(space, names, stats, lambdas, config)
    shape, D = check_call(stats, segments, out)
    S = len(stats)
    xp = space.xp
    shim, view, block, threads = adapter.engine(space, native)
    target = adapter.empty(space, shape, output=True) if out is None else out
    flat = xp.reshape(target, (-1,)) if adapter.contiguous(target) else None
    work = adapter.empty(space, (D,)) if flat is None else flat
    outputs = None
    if full:
        e, w = adapter.empty(space, (S, D), True), adapter.empty(space, (S, D), True)
        U, s = adapter.empty(space, (D,), True), adapter.empty(space, (D,), True)
        outputs = Outputs(view(e), view(w), view(U), view(s))
    info: dict[str, Any] = {}
    counts = [_flat_count(xp, st.count, shape) for st in stats]
    summary = None
    if summarize is not False and summarize is not None and diagnostics is not None:
        summary = Summary(None if summarize is True else summarize)
    with adapter.context():
        gradient(shim, names, [view(xp.reshape(st.mean, (-1,))) for st in stats],
                 [view(xp.reshape(st.m2, (-1,))) for st in stats],
                 [c if isinstance(c, float) else view(c) for c in counts], lambdas, config,
                 view(work), segments, min(block, D), space.tiny,
                 str(space.dtype).endswith("float32"), info, threads=threads, outputs=outputs,
                 summary=summary,
                 check=(lambda: check_stats(names, stats)) if check_values else None)
    finite = info.pop("finite", False)
    if check_values:
        info["finite"] = finite
    if flat is None:
        target[...] = xp.reshape(work, shape)
    info["path"] = adapter.name
    if summary is not None:
        info["segments"] = [
            from_reductions(names, Reductions(**fields), {
                "path": adapter.name,
                "zero_variance_sources": [n for n, z in zip(names, summary.zero_var[:, g]) if z],
            })
            for g, fields in enumerate(summary.finish(shim, config.s_max))
        ]
    if diagnostics is not None:
        diagnostics.update(info)
    if not full:
        return target
    flags = {"path": adapter.name, "zero_variance_sources": info.get("zero_variance_sources", [])}
    return Calibration(target, xp.reshape(w, (S,) + shape), xp.reshape(U, shape),
                       xp.reshape(s, shape), xp.reshape(e, (S,) + shape), names,
                       float(config.prior_weight), flags)


class Adapter:
    """One array library: its name, which arrays it takes, and the engine's operations.

    ``kernels``: where set, a compiled full result that replaces the engine
    for :meth:`calibrate` (the CUDA kernels of ``cupy-fused``).
    """

    name = ""
    kernels: Callable[..., Calibration] | None = None

    def accepts(self, space: Any) -> bool:
        raise NotImplementedError

    def engine(self, space: Any, native: bool) -> tuple[Shim, Callable[[Any], Any], int, int]:
        """``(shim, view, block, threads)``: ``view`` maps an array of the library to
        what ``shim`` operates on (zero copy), ``block`` the engine's block length."""
        raise NotImplementedError

    def empty(self, space: Any, shape: tuple[int, ...], output: bool = False) -> Any:
        """An uninitialised array (``output``: one returned to the caller)."""
        return space.xp.empty(shape, dtype=space.dtype)

    def contiguous(self, x: Any) -> bool:
        return bool(x.flags.c_contiguous)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        # 1/Q for Q = 0 and 1/(1 + inf) are intended (they give B = 0 and U = 0).
        with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
            yield

    def calibrate(self, space: Any, names: Sequence[str], stats: Sequence[Any],
                  lambdas: Sequence[float], config: CalibrationConfig) -> Calibration:
        """The full :class:`Calibration` of one group (float32/float64 arrays)."""
        result: Calibration = run(self, space, names, stats, lambdas, config, full=True)
        return result

    #: ``calibrate(...).gradient`` alone, per segment; written into ``out`` when
    #: given (the statistics' shape, dtype and device), only after every check.
    calibrate_gradient = run


_HUGE_MIN_BYTES = 4 << 20


def hugepage_buffer(nbytes: int) -> Any | None:
    """Anonymous memory advised for transparent huge pages, or None where unsupported.

    A fresh output is written once; with 4 KiB pages the first touch of each
    page costs a kernel fault that, for the ``(2S + 3) D`` outputs of a full
    result, can take longer than the computation. 2 MiB pages cut the number
    of faults 512-fold. The mapping is released with the last array viewing it.
    """
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_MIN_BYTES or advice is None:
        return None
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return None
    return mm
