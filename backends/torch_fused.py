"""PyTorch fused path (CPU and CUDA): the chunked pipeline of :mod:`._chunked`.

Eager and hand-fused: every step is one ``torch.*(..., out=)`` call into a
preallocated output or a chunk-sized workspace, so no ``(S, D)`` temporary is
ever created, and on the CPU a chunk's intermediates stay in L2 between
steps (which is what makes a sequence of eager ops run near memory speed).
``torch.compile`` is not needed; see :func:`set_chunk` for tuning.

On CUDA the chunk is large (so the ~40 launches per chunk amortise); the
log-score pass reads back two scalars per chunk (its sum and minimum, which
choose between the one-log and the careful form), the other sums stay on the
device until the end of their pass. The dedicated GPU path is
:mod:`.cupy_fused`, which fuses each pass into one kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import torch

from bogc_core._types import Calibration, CalibrationConfig
from bogc_core.dispatch import register
from bogc_core.errors import ConfigError

from ._chunked import Ops, hugepage_buffer, run_chunked

__all__ = ["NAME", "TorchOps", "run", "accepts", "set_chunk", "chunk_for", "DEFAULT_CHUNK"]

NAME = "torch-fused"
# CPU: 2^16 float32 = 256 KiB per buffer, so a step's operands stay in L2.
# CUDA: large enough that the ~40 launches per chunk amortise.
DEFAULT_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}
_CHUNK = dict(DEFAULT_CHUNK)


def set_chunk(device_type: str, elements: int) -> None:
    """Set the chunk length (elements; per intra-op thread on the CPU) for ``device_type``."""
    if not (isinstance(elements, int) and elements >= 1):
        raise ConfigError(
            f"elements: must be an int >= 1 (default {DEFAULT_CHUNK}), got {elements!r}"
        )
    _CHUNK[device_type] = int(elements)


def chunk_for(device: torch.device) -> int:
    """Chunk length on ``device``; on the CPU it scales with the intra-op threads.

    Every eager op on a chunk is one parallel region; each thread should get
    about ``_CHUNK["cpu"]`` elements so that the per-region synchronisation
    (costly when the cores are shared with other processes) stays amortised.
    """
    if device.type == "cpu":
        return _CHUNK["cpu"] * max(1, torch.get_num_threads())
    return _CHUNK.get(device.type, _CHUNK["cuda"])


class TorchOps(Ops):
    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.on_cpu = device.type == "cpu"
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def empty(self, shape):
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def empty_output(self, shape):
        if self.on_cpu:
            n = math.prod(shape)
            mm = hugepage_buffer(n * self.itemsize)
            if mm is not None:
                return torch.frombuffer(mm, dtype=self.dtype, count=n).reshape(shape)
        return self.empty(shape)

    def flat(self, x):
        return x.reshape(-1)

    def flat_count(self, count, shape):
        return count.expand(shape).reshape(-1)

    def numel(self, x):
        return int(x.numel())

    def item(self, x):
        return float(x.reshape(-1)[0])

    def reshape(self, x, shape):
        return x.reshape(shape)

    def zero_acc(self):
        if self.on_cpu:
            return 0.0
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def acc_sum(self, acc, x):
        if self.on_cpu:
            return acc + x.sum().item()
        # No host synchronisation per chunk on an accelerator.
        return acc + x.sum(dtype=torch.float64)

    def min_float(self, x):
        return x.min().item()

    def sum_float(self, x):
        # A chunk sum in the dtype (cascade summation) is accurate; the caller
        # accumulates chunks in Python floats.
        return x.sum().item()

    def finite_sum(self, x):
        ok = torch.isfinite(x)
        return torch.where(ok, x, 0.0).sum(dtype=torch.float64).item(), float(ok.sum().item())

    def to_float(self, acc):
        return float(acc)

    def copy(self, x, out):
        return out.copy_(x)

    def fill(self, out, value):
        return out.fill_(value)

    def add(self, a, b, out):
        return torch.add(a, b, out=out)

    def mul(self, a, b, out):
        return torch.mul(a, b, out=out)

    def div(self, a, b, out):
        return torch.div(a, b, out=out)

    def rdiv(self, a, b, out):
        torch.reciprocal(b, out=out)
        return out.mul_(a)

    def addcmul(self, acc, a, b, value, tmp):
        return torch.addcmul(acc, a, b, value=value, out=acc)

    def axpy(self, acc, x, alpha, tmp):
        return acc.add_(x, alpha=alpha)

    def affine(self, x, scale, shift, out):
        if scale == 1.0:  # the default snr, gamma = 0.5
            return torch.add(x, shift, out=out)
        torch.mul(x, scale, out=out)
        return out.add_(shift)

    def clamp(self, x, lo, hi, out):
        return torch.clamp(x, min=lo, max=hi, out=out)

    def abs(self, x, out):
        return torch.abs(x, out=out)

    def sqrt(self, x, out):
        return torch.sqrt(x, out=out)

    def recip(self, x, out):
        return torch.reciprocal(x, out=out)

    def log(self, x, out):
        return torch.log(x, out=out)

    def exp(self, x, out):
        return torch.exp(x, out=out)

    def ge(self, x, value, out):
        return out.copy_(x >= value)


def accepts(space: Any) -> bool:
    return bool(array_api_compat.is_torch_namespace(space.xp))


def run(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration | str:
    """Runner for :func:`bogc_core.dispatch.register` (float32/float64 tensors, any device)."""
    dtype = space.dtype  # run_chunked's decline_reason covers dtype and requires_grad
    device = torch.device(space.device)
    with torch.no_grad():
        return run_chunked(
            TorchOps(dtype, device), NAME, space, names, stats, lambdas, config, chunk_for(device)
        )


register(NAME, accepts, run)
