"""PyTorch fast path (CPU and CUDA): the engine of :mod:`._gradient` on tensors.

On the CPU the engine runs on zero-copy NumPy views of the tensors: the
compiled loops of :mod:`._numba_kernel` take NumPy arrays, and the array
engine is faster there than on the tensors themselves (``benchmarks/kernel.py
--native``: 0.24 s against 0.72 s at D = 1e7, S = 3, float32, one thread;
both tested equal to the reference). On CUDA the engine runs on the tensors,
one block per call (whole-array kernels, segment sums by
``torch.segment_reduce``), which is not yet run on a GPU; ``native=True``
forces that tensor code on the CPU, which is how it is tested without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat
import numpy as np
import torch

from ._adapter import BLOCK, Adapter, hugepage_buffer, identity
from ._gradient import NumpyShim, Shim

__all__ = ["GRADIENT_OPTIONS", "NAME", "TorchShim", "accepts", "calibrate", "calibrate_gradient",
           "chunk_moments"]

NAME = "torch-fused"
_FLOATS = (torch.float32, torch.float64)


class TorchShim(Shim):
    """The gradient engine's operations on tensors of one device."""

    xp = torch

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def work(self, x: Any) -> Any:
        return x.to(dtype=torch.float64)

    def segsum(self, x: Any, offsets: Any) -> Any:
        lengths = torch.diff(offsets, append=torch.tensor([x.shape[0]], device=offsets.device))
        return torch.segment_reduce(x.to(torch.float64), "sum", lengths=lengths)

    def expand(self, vals: Any, counts: Any) -> Any:
        return torch.repeat_interleave(vals, counts)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def index(self, x: np.ndarray) -> Any:
        return torch.as_tensor(x, dtype=torch.int64, device=self.device)

    def asarray(self, x: Any) -> Any:
        return torch.as_tensor(np.asarray(x, dtype=np.float64), device=self.device)

    def store(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def cast(self, x: Any, like: Any) -> Any:
        return x.to(like.dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()


def _numpy_view(x: Any) -> Any:
    return x.numpy()


class TorchAdapter(Adapter):
    name = NAME

    def accepts(self, space: Any) -> bool:
        """PyTorch tensors on any device (the call declines what it cannot take)."""
        return bool(array_api_compat.is_torch_namespace(space.xp))

    def engine(self, space: Any, native: bool) -> tuple[Shim, Callable[[Any], Any], int, int]:
        device = torch.device(space.device)
        if device.type == "cpu" and not native:
            return NumpyShim(), _numpy_view, BLOCK["cpu"], torch.get_num_threads()
        block = BLOCK["cpu"] if device.type == "cpu" else 1 << 62
        return TorchShim(device), identity, block, 1

    def empty(self, space: Any, shape: tuple[int, ...], output: bool = False) -> Any:
        device = torch.device(space.device)
        if output and device.type == "cpu":
            n = int(np.prod(shape))
            itemsize = torch.empty((), dtype=space.dtype).element_size()
            mm = hugepage_buffer(n * itemsize)
            if mm is not None:
                return torch.frombuffer(mm, dtype=space.dtype, count=n).reshape(shape)
        return torch.empty(shape, dtype=space.dtype, device=device)

    def contiguous(self, x: Any) -> bool:
        return bool(x.is_contiguous())

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with torch.no_grad(), super().context():
            yield


#: What the adapter's ``calibrate_gradient`` (:func:`._adapter.run`) takes beyond the protocol.
GRADIENT_OPTIONS = ("summarize", "check_values")
ADAPTER = TorchAdapter()
accepts = ADAPTER.accepts
calibrate = ADAPTER.calibrate
calibrate_gradient = ADAPTER.calibrate_gradient


def chunk_moments(g: torch.Tensor, inv: float, mean: torch.Tensor, m2: torch.Tensor) -> bool:
    """Stage 0 of equal micro-batches: ``mean`` and ``M2`` (``g[0]``'s numel each) of the
    samples ``g[j] * inv``, ``g`` ``(C, ...)``, written by the compiled loop in one pass
    (``True``); ``False``, nothing written, where it cannot take them (numba missing, not
    contiguous CPU tensors of one dtype, float32 or float64)."""
    from . import _numba_kernel  # numba is imported on first use, not with the module

    if not (_numba_kernel.AVAILABLE and _numba_kernel.ENABLED[0] and g.dtype in _FLOATS
            and all(t.dtype == g.dtype and t.device.type == "cpu" and t.is_contiguous()
                    for t in (g, mean, m2))):
        return False
    x = g.detach().numpy().reshape(g.shape[0], -1)
    _numba_kernel.moments(x, x.dtype.type(inv), mean.detach().numpy().reshape(-1),
                          m2.detach().numpy().reshape(-1))
    return True
