"""Compile the ``cupy-fused`` kernels with nvcc or g++, and call the g++ build from NumPy.

:func:`units` lists the translation units every check compiles (module
:mod:`.cuda_tu`); :func:`nvcc_compile` builds them for GPUs, :class:`HostKernels`
builds them for the CPU and launches them on NumPy arrays the way CuPy
launches them on device arrays (broadcasting, reduced views, launch shape).

Many units go into one compiler call: each unit is wrapped in its own
namespace (its ``typedef T`` and preamble stay its own) and its kernel name
gets a suffix, so one nvcc or g++ run replaces dozens; what each unit
contains is exactly its own translation unit.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bogc_core.backends import _cuda_kernels as K

from .cuda_tu import HEADERS, Unit, elementwise_unit, reduction_launch, reduction_unit

DTYPES = ("float32", "float64")
#: Source counts the fusion kernel is compiled and run for (code differs with S and its parity).
FUSE_S = (1, 2, 3, 4)
ARCHS = ("sm_80", "sm_90")
REDUCTIONS = (K.SCORE_SUM, K.SCORE_COUNT, K.EB_SUM, K.EB_COUNT)


@dataclass(frozen=True)
class Entry:
    """One compiled unit: which kernel, for what dtype and argument layout."""

    key: tuple[Any, ...]  # (kernel name, dtype, ndim, array inputs)
    unit: Unit
    reduction: bool


def _count_arrays(S: int) -> frozenset[str]:
    return frozenset(f"{p}{k}" for k in range(S) for p in ("m", "v"))


def units() -> list[Entry]:
    """Every kernel in every argument layout ``cupy_fused`` launches it with.

    Reductions: all inputs arrays (``cupy_fused`` passes scalars as 0-d arrays),
    1-D (contiguous statistics, CuPy's reduced view merges the broadcast
    scalars' axes) and 2-D (a per-row count of shape ``(rows, 1)`` keeps two
    axes). Fusion: one count per source (a scalar) or per-dimension counts
    (arrays, 2-D with a broadcast count).
    """
    out = []
    for dt in DTYPES:
        for k in REDUCTIONS:
            names = frozenset(n for _, n in _params(k.in_params))
            scalars = frozenset(n for n in names if n not in ("m", "m2"))
            for ndim, strided in ((1, scalars), (2, scalars)):
                u = reduction_unit(k, dt, ndim=ndim, strided=strided, suffix=f"_{dt}_{ndim}d")
                out.append(Entry((k.name, dt, ndim, names), u, True))
        u = elementwise_unit(K.SCALE, dt, suffix=f"_{dt}")
        out.append(Entry((K.SCALE.name, dt, 1, frozenset()), u, False))
        for S in FUSE_S:
            for w in K.WEIGHTS:
                k = K.fuse(S, w)
                arrays = _count_arrays(S)
                u = elementwise_unit(k, dt, arrays=arrays, suffix=f"_{dt}")
                out.append(Entry((k.name, dt, 1, arrays), u, False))
                per_dim = arrays | {f"n{j}" for j in range(S)}
                strided = frozenset(f"n{j}" for j in range(S))
                u = elementwise_unit(
                    k, dt, ndim=2, arrays=per_dim, strided=strided, suffix=f"_{dt}_counts"
                )
                out.append(Entry((k.name, dt, 2, per_dim), u, False))
    return out


def _params(plist: str) -> list[tuple[str, str]]:
    return [tuple(p.split()) for p in plist.split(",")]  # type: ignore[misc]


def batch_source(entries: list[Entry], target: str) -> tuple[str, list[tuple[int, int, Entry]]]:
    """One source holding every unit, each in its namespace; with each unit's line range."""
    lines = ['#include "cuda_host.h"'] if target == "host" else []
    lines.append('#include "cupy_model.cuh"')
    ranges = []
    for i, e in enumerate(entries):
        start = len(lines) + 1
        lines.append(f"namespace unit{i} {{")
        lines += e.unit.body.splitlines()
        lines.append("}")
        lines += ["#undef REDUCE", "#undef POST_MAP"] if e.reduction else []
        ranges.append((start, len(lines), e))
    return "\n".join(lines) + "\n", ranges


@dataclass
class NvccResult:
    arch: str
    returncode: int
    log: str
    seconds: float
    source_lines: list[tuple[int, int, Entry]]

    def diagnostics(self, entry: Entry) -> list[str]:
        """Compiler errors and warnings on lines of ``entry``'s unit (file:line: ...)."""
        out = []
        for m in re.finditer(r"^.*?\.cu\((\d+)\): (error|warning)[^\n]*$", self.log, re.M):
            line = int(m.group(1))
            for a, b, e in self.source_lines:
                if a <= line <= b and e is entry:
                    out.append(m.group(0))
        return out

    def resources(self, kernel: str) -> dict[str, int] | None:
        """ptxas's registers, stack frame and spill bytes of ``kernel``, or None if not compiled."""
        m = re.search(
            rf"Function properties for {re.escape(kernel)}\s*\n\s*(\d+) bytes stack frame, "
            rf"(\d+) bytes spill stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers",
            self.log,
        )
        if not m:
            return None
        stack, stores, loads, regs = (int(g) for g in m.groups())
        return {"stack": stack, "spill_stores": stores, "spill_loads": loads, "registers": regs}


def nvcc_compile(
    entries: list[Entry], archs: tuple[str, ...], workdir: Path
) -> dict[str, NvccResult]:
    """``nvcc -arch=<arch> -cubin`` of every unit (one batch per arch, the archs compiled
    concurrently), with ptxas's resource report."""
    nvcc = shutil.which("nvcc")
    assert nvcc
    src, ranges = batch_source(entries, "nvcc")
    t0 = time.perf_counter()
    procs = {}
    for arch in archs:
        cu = workdir / f"kernels_{arch}.cu"
        cu.write_text(src)
        cmd = [
            nvcc,
            f"-arch={arch}",
            "-cubin",
            "-std=c++17",
            "-I",
            str(HEADERS),
            "-Xptxas",
            "-v",
            "-o",
            str(workdir / f"kernels_{arch}.cubin"),
            str(cu),
        ]
        procs[arch] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out = {}
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        seconds = time.perf_counter() - t0
        out[arch] = NvccResult(arch, proc.returncode, log, seconds, ranges)
    return out


def _launcher(i: int, e: Entry) -> str:
    """``extern "C" int launch_<kernel>(grid, block, reverse, args, meta)`` for unit ``i``."""
    decls, call = [], []
    for j, p in enumerate(e.unit.params):
        v = f"a{j}"
        if p.kind == "array":
            decls.append(
                f"CArray<{p.ctype}, {p.ndim}, {int(p.contiguous)}, 1> {v}; "
                f"{v}.data_ = ({p.ctype}*)args[{j}]; {v}.size_ = meta[k++];"
            )
            for d in range(p.ndim):
                decls.append(f"{v}.shape_[{d}] = meta[k++];")
            for d in range(p.ndim):
                decls.append(f"{v}.strides_[{d}] = meta[k++];")
        elif p.kind == "indexer":
            decls.append(f"CIndexer<{p.ndim}, 1> {v}; {v}.size_ = meta[k++];")
            for d in range(p.ndim):
                decls.append(f"{v}.shape_[{d}] = meta[k++];")
        else:
            decls.append(f"const {p.ctype} {v} = *(const {p.ctype}*)args[{j}];")
        call.append(v)
    body = "\n  ".join(decls)
    return (
        f'extern "C" int launch_{e.unit.kernel}(unsigned int grid, unsigned int block, '
        "int reverse, void** args, const long long* meta) {\n"
        f"  int k = 0;\n  {body}\n  (void)k;\n"
        f"  return bogc_host::launch(grid, block, reverse != 0, [&]() {{ "
        f"unit{i}::{e.unit.kernel}({', '.join(call)}); }});\n}}\n"
    )


GXX_FLAGS = [
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
    "-fno-fast-math",
    "-ffp-contract=off",
]


class HostKernels:
    """The units built with g++ as one shared library, launched on NumPy arrays."""

    def __init__(self, entries: list[Entry], workdir: Path):
        gxx = shutil.which("g++")
        assert gxx
        src, _ = batch_source(entries, "host")
        src += "".join(_launcher(i, e) for i, e in enumerate(entries))
        cpp = workdir / "kernels_host.cpp"
        cpp.write_text(src)
        so = workdir / "kernels_host.so"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [gxx, *GXX_FLAGS, "-I", str(HEADERS), "-o", str(so), str(cpp)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.seconds = time.perf_counter() - t0
        self.log = proc.stdout + proc.stderr
        self.returncode = proc.returncode
        self.entries = {e.key: e for e in entries}
        self.lib = ctypes.CDLL(str(so)) if proc.returncode == 0 else None
        #: Launch order of the threads of a block (reverse shakes out missing barriers).
        self.reverse = False
        #: Elementwise launches: threads per block and blocks (None: CuPy's, enough blocks
        #: for one element per thread).
        self.block = 128
        self.grid: int | None = None
        #: Reductions: threads per block (CuPy's default 512).
        self.reduce_block = 512

    def _launch(
        self, e: Entry, values: dict[str, Any], loop_shape: tuple[int, ...], grid: int, block: int
    ) -> None:
        assert self.lib is not None
        args, meta, keep = [], [], []
        size = int(np.prod(loop_shape))
        for p in e.unit.params:
            if p.kind == "array":
                a = values[p.name]
                assert a.ndim == p.ndim and a.dtype == np.dtype(_NP[p.ctype]), (p, a.dtype)
                keep.append(a)
                args.append(a.ctypes.data)
                meta += [a.size, *a.shape, *a.strides]
            elif p.kind == "indexer":
                shape = loop_shape if p.name in ("_ind", "_in_ind") else ()
                meta += [size if shape else 1, *shape]
                args.append(None)
            else:
                v = np.array(values[p.name], dtype=_NP[p.ctype])
                keep.append(v)
                args.append(v.ctypes.data)
        c_args = (ctypes.c_void_p * len(args))(*args)
        c_meta = (ctypes.c_longlong * max(1, len(meta)))(*meta)
        fn = getattr(self.lib, f"launch_{e.unit.kernel}")
        rc = fn(
            ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_int(self.reverse), c_args, c_meta
        )
        if rc != 0:
            raise RuntimeError(f"{e.unit.kernel}: a __syncthreads() not reached by every thread")

    def reduce(self, k: K.Reduction, *inputs: Any) -> float:
        """``k(*inputs)`` as ``cupy.ReductionKernel`` computes it (over every axis)."""
        names = [n for _, n in _params(k.in_params)]
        arrs = [np.asarray(a) for a in inputs]
        dtype = _statistics_dtype(k.in_params, arrs)
        shape = np.broadcast_shapes(*(a.shape for a in arrs))
        views = [np.broadcast_to(a, shape) for a in arrs]
        if len(shape) != 1 and _mergeable(views):
            views = [_flat(v) for v in views]
            shape = (int(np.prod(shape)),)
        e = self.entries[(k.name, dtype, len(shape), frozenset(names))]
        out = np.zeros((), dtype=np.float64)
        values: dict[str, Any] = dict(zip(names, views))
        values[_params(k.out_params)[0][1]] = out
        grid, stride = reduction_launch(int(np.prod(shape)), 1, self.reduce_block)
        values["_block_stride"] = stride
        self._launch(e, values, shape, grid, self.reduce_block)
        return float(out)

    def elementwise(self, k: K.Elementwise, *args: Any) -> None:
        """``k(*args)`` with every output given, as ``cupy.ElementwiseKernel`` runs it."""
        names = [n for _, n in _params(k.in_params) + _params(k.out_params)]
        array_names = [n for n, a in zip(names, args) if isinstance(a, np.ndarray) and a.ndim]
        arrs = {n: a for n, a in zip(names, args) if n in array_names}
        dtype = _statistics_dtype(k.in_params + ", " + k.out_params, list(arrs.values()))
        shape = np.broadcast_shapes(*(a.shape for a in arrs.values()))
        views = {n: np.broadcast_to(a, shape) for n, a in arrs.items()}
        if all(v.flags.c_contiguous for v in views.values()):
            views = {n: v.reshape(-1) for n, v in views.items()}
            shape = (int(np.prod(shape)),)
        ins = frozenset(n for n in array_names if n in [m for _, m in _params(k.in_params)])
        e = self.entries[(k.name, dtype, len(shape), ins)]
        values: dict[str, Any] = {n: a for n, a in zip(names, args) if n not in arrs}
        values.update(views)
        size = int(np.prod(shape))
        grid = self.grid or max(1, -(-size // self.block))
        self._launch(e, values, shape, grid, self.block)


_NP = {"float": np.float32, "double": np.float64, "int": np.int32}


def _statistics_dtype(plist: str, arrays: list[np.ndarray]) -> str:
    """The dtype bound to ``T``: that of the first array given for a ``T`` parameter."""
    for a in arrays:
        if a.dtype in (np.float32, np.float64):
            return str(a.dtype)
    raise ValueError(f"no floating array for {plist}")


def _mergeable(views: list[np.ndarray]) -> bool:
    """CuPy's reduced view: axes merge when every array is contiguous or constant along them."""
    return all(v.flags.c_contiguous or not any(v.strides) for v in views)


def _flat(v: np.ndarray) -> np.ndarray:
    if v.flags.c_contiguous:
        return v.reshape(-1)
    return np.lib.stride_tricks.as_strided(v, (v.size,), (0,))
