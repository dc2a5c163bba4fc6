"""Translation units of the ``cupy-fused`` kernels, laid out as CuPy lays them out.

CuPy compiles an ``ElementwiseKernel`` or ``ReductionKernel`` as one
translation unit: its headers (here the model ``cuda/cupy_model.cuh``), one
``typedef`` per type placeholder (``typedef float T;``), the kernel's
preamble, then an ``extern "C" __global__`` function whose parameters are
``CArray<ctype, ndim, c_contiguous, 32bit>`` for arrays (named ``_raw_x``),
plain C values for scalars (``const float x``), and ``CIndexer`` s. Inside
the loop each array element is bound to its parameter name
(``const T &x = _raw_x[_ind.get()];``, outputs as non-const references), and
the kernel's own text follows. Type names of the parameter lists map to C:
``float32`` -> ``float``, ``float64`` -> ``double``, ``int32`` -> ``int``.

Reductions reduce over every axis (all ``cupy_fused`` does) with CuPy's
simple-reduction scheme, written here from its description: each thread of a
``block``-thread block folds a strided share of the input with the map and
reduce expressions, then the block folds the ``block`` partial results in
shared memory by halving, with ``__syncthreads()`` between steps, and the
post-map expression writes the output. ``block_stride`` and the grid are
chosen as CuPy chooses them (:func:`reduction_launch`).

The same text compiles with nvcc (``target="nvcc"``) and with g++
(``target="host"``, with ``cuda/cuda_host.h`` mapping the CUDA built-ins).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bogc_core.backends._cuda_kernels import Elementwise, Reduction

HEADERS = Path(__file__).with_name("cuda")

#: C types of the dtype names of CuPy's parameter lists.
CTYPES = {"float32": "float", "float64": "double", "int32": "int"}


@dataclass(frozen=True)
class Param:
    """One parameter of the generated ``__global__`` function."""

    kind: str  # "array", "scalar", "indexer" or "int" (the reduction's block stride)
    ctype: str  # element or value type; "" for an indexer
    name: str  # the C variable name
    ndim: int = 0
    contiguous: bool = True
    const: bool = True


@dataclass(frozen=True)
class Unit:
    """One kernel's translation unit and its launch signature."""

    kernel: str
    body: str  # everything after the headers
    params: tuple[Param, ...]

    def source(self, target: str) -> str:
        include = '#include "cupy_model.cuh"\n'
        if target == "host":
            include = '#include "cuda_host.h"\n' + include
        return include + self.body


def parse_params(params: str) -> list[tuple[str, str]]:
    """``"T n, int32 snr"`` -> ``[("T", "n"), ("int32", "snr")]``."""
    out = []
    for item in params.split(","):
        words = item.split()
        if len(words) != 2:
            raise ValueError(f"unsupported parameter {item!r} (raw and keywords are not modelled)")
        out.append((words[0], words[1]))
    return out


def _ctype(t: str, ctype_of_T: str) -> str:
    return ctype_of_T if len(t) == 1 else CTYPES[t]


def _array_decl(p: Param) -> str:
    const = "const " if p.const else ""
    return f"{const}CArray<{p.ctype}, {p.ndim}, {int(p.contiguous)}, 1> _raw_{p.name}"


def _param_decl(p: Param) -> str:
    if p.kind == "array":
        return _array_decl(p)
    if p.kind == "indexer":
        return f"CIndexer<{p.ndim}, 1> {p.name}"
    return f"const {p.ctype} {p.name}"


def elementwise_unit(
    k: Elementwise,
    dtype: str,
    *,
    ndim: int = 1,
    arrays: frozenset[str] = frozenset(),
    strided: frozenset[str] = frozenset(),
    suffix: str = "",
) -> Unit:
    """``k`` for statistics of ``dtype``: inputs named in ``arrays`` are arrays, the others
    scalars; every array has the loop's ``ndim``; those in ``strided`` are not C-contiguous."""
    T = CTYPES[dtype]
    params: list[Param] = []
    loads = []
    for is_out, plist in ((False, k.in_params), (True, k.out_params)):
        for t, name in parse_params(plist):
            c = _ctype(t, T)
            if is_out or name in arrays:
                params.append(Param("array", c, name, ndim, name not in strided, const=not is_out))
                ref = f"{c} &" if is_out else f"const {c} &"
                loads.append(f"{ref}{name} = _raw_{name}[_ind.get()];")
            else:
                params.append(Param("scalar", c, name))
    params.append(Param("indexer", "", "_ind", ndim, const=False))
    kernel = k.name + suffix
    body = (
        f"typedef {T} T;\n"
        f"{k.preamble}\n"
        f'extern "C" __global__ void {kernel}({", ".join(map(_param_decl, params))}) {{\n'
        "  CUPY_FOR(i, _ind.size()) {\n"
        "    _ind.set(i);\n" + "".join(f"    {line}\n" for line in loads) + f"    {k.operation};\n"
        "  }\n"
        "}\n"
    )
    return Unit(kernel, body, tuple(params))


def reduction_unit(
    k: Reduction,
    dtype: str,
    *,
    ndim: int = 1,
    strided: frozenset[str] = frozenset(),
    block: int = 512,
    suffix: str = "",
) -> Unit:
    """``k`` over every axis of ``ndim``-dimensional inputs of ``dtype`` (all inputs arrays,
    as ``cupy_fused`` passes them); ``block`` threads per block."""
    T = CTYPES[dtype]
    params: list[Param] = []
    loads, outs = [], []
    for t, name in parse_params(k.in_params):
        c = _ctype(t, T)
        params.append(Param("array", c, name, ndim, name not in strided))
        loads.append(f"const {c} {name} = _raw_{name}[_in_ind.get()];")
    out_types = parse_params(k.out_params)
    if len(out_types) != 1:
        raise ValueError("one output")
    (t, name), reduce_type = out_types[0], _ctype(out_types[0][0], T)
    params.append(Param("array", reduce_type, name, 0, True, const=False))
    outs.append(f"{reduce_type} &{name} = _raw_{name}[_out_ind.get()];")
    params += [
        Param("indexer", "", "_in_ind", ndim, const=False),
        Param("indexer", "", "_out_ind", 0, const=False),
        Param("int", "int", "_block_stride"),
    ]
    kernel = k.name + suffix
    body = f"""typedef {T} T;
typedef int IndexT;
{k.preamble}
#define REDUCE(a, b) ({k.reduce_expr})
#define POST_MAP(a) ({k.post_map_expr})
typedef {reduce_type} _type_reduce;
extern "C" __global__ void {kernel}({", ".join(map(_param_decl, params))}) {{
  __shared__ char _sdata_raw[{block} * sizeof(_type_reduce)];
  _type_reduce* _sdata = reinterpret_cast<_type_reduce*>(_sdata_raw);
  const unsigned int _tid = threadIdx.x;
  const ptrdiff_t _out_size = _out_ind.size();
  // _block_stride consecutive threads serve consecutive outputs; the block's
  // {block} / _block_stride lanes split the reduced axis of each output.
  const ptrdiff_t _lane = _tid / _block_stride;
  const ptrdiff_t _lanes = {block} / _block_stride;
  for (ptrdiff_t _i_base = (ptrdiff_t)blockIdx.x * _block_stride; _i_base < _out_size;
       _i_base += (ptrdiff_t)gridDim.x * _block_stride) {{
    const ptrdiff_t _i = _i_base + _tid % _block_stride;
    _type_reduce _s = _type_reduce({k.identity});
    for (ptrdiff_t _j = _i + _lane * _out_size; _j < _in_ind.size(); _j += _lanes * _out_size) {{
      _in_ind.set(_j);
{"".join(f"      {line}{chr(10)}" for line in loads)}      _type_reduce _a = static_cast<_type_reduce>({k.map_expr});
      _s = REDUCE(_s, _a);
    }}
    _sdata[_tid] = _s;
    __syncthreads();
    for (unsigned int _half = {block} / 2; _half >= (unsigned int)_block_stride; _half >>= 1) {{
      if (_tid < _half) {{
        _type_reduce _x = _sdata[_tid], _y = _sdata[_tid + _half];
        _sdata[_tid] = REDUCE(_x, _y);
      }}
      __syncthreads();
    }}
    if (_tid < (unsigned int)_block_stride && _i < _out_size) {{
      _out_ind.set(_i);
{"".join(f"      {line}{chr(10)}" for line in outs)}      POST_MAP(_sdata[_tid]);
    }}
  }}
}}
"""
    return Unit(kernel, body, tuple(params))


def reduction_launch(in_size: int, out_size: int = 1, block: int = 512) -> tuple[int, int]:
    """``(grid, block_stride)`` as CuPy picks them for a reduction of ``in_size`` inputs
    into ``out_size`` outputs (contiguous inputs): the largest power of two at most
    ``block / (in_size / out_size)``, at least 1."""
    per_out = max(1, in_size // out_size)
    stride = max(1, block // per_out)
    stride = 1 << (stride.bit_length() - 1)
    return (out_size + stride - 1) // stride, stride
