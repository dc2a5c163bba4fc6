"""PyTorch fast path (CPU and CUDA): the blocked pipelines of :mod:`._blocked`
(full result) and :mod:`._gradient` (gradient only).

``calibrate``: every step is one ``torch.*(..., out=)`` call into a
preallocated output or a block-sized workspace, so no ``(S, D)`` temporary is
created and on the CPU a block's intermediates stay in L2 (see
:func:`set_block` for tuning).

``calibrate_gradient``: on the CPU the statistics are viewed as NumPy arrays
(zero copy) and the NumPy engine runs, whose ``log``/``exp`` are faster than
PyTorch's CPU kernels; on CUDA the same engine runs on tensors with one block
per call (whole-array kernels, segment sums by ``torch.segment_reduce``),
which is not yet run on a GPU. ``native=True`` forces the tensor engine on the
CPU too, which is how its code path is tested without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np
import torch

from bogc_core._types import Calibration, CalibrationConfig
from bogc_core.errors import ConfigError

from ._blocked import Ops, hugepage_buffer, run_blocked
from ._gradient import NumpyShim, Shim, gradient
from .numpy_fused import GRADIENT_BLOCK, check_gradient_call

__all__ = [
    "NAME",
    "TorchOps",
    "TorchShim",
    "accepts",
    "calibrate",
    "calibrate_gradient",
    "set_block",
    "block_for",
    "DEFAULT_BLOCK",
]

NAME = "torch-fused"
# CPU: 2^16 float32 = 256 KiB per buffer, so a step's operands stay in L2.
# CUDA: large enough that the ~40 launches per block amortise.
DEFAULT_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 22}
_BLOCK = dict(DEFAULT_BLOCK)


def set_block(device_type: str, elements: int) -> None:
    """Set the cache-block length (elements; per intra-op thread on the CPU) for ``device_type``."""
    if not (isinstance(elements, int) and elements >= 1):
        raise ConfigError(
            f"elements: must be an int >= 1 (default {DEFAULT_BLOCK}), got {elements!r}"
        )
    _BLOCK[device_type] = int(elements)


def block_for(device: torch.device) -> int:
    """Block length on ``device``; on the CPU it scales with the intra-op threads.

    Every eager op on a block is one parallel region; each thread should get
    about ``_BLOCK["cpu"]`` elements so that the per-region synchronisation
    (costly when the cores are shared with other processes) stays amortised.
    """
    if device.type == "cpu":
        return _BLOCK["cpu"] * max(1, torch.get_num_threads())
    return _BLOCK.get(device.type, _BLOCK["cuda"])


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
        # No host synchronisation per block on an accelerator.
        return acc + x.sum(dtype=torch.float64)

    def min_float(self, x):
        return x.min().item()

    def sum_float(self, x):
        # A block sum in the dtype (cascade summation) is accurate; the caller
        # accumulates blocks in Python floats.
        return x.sum().item()

    def finite_sum(self, x):
        ok = torch.isfinite(x)
        return torch.where(ok, x, 0.0).sum(dtype=torch.float64).item(), float(ok.sum().item())

    def to_float(self, acc):
        return float(acc)

    def count_zero(self, x):
        return int(x.numel() - torch.count_nonzero(x).item())

    def count_not_normal(self, x, tiny):
        return int(((x < tiny) | (x == math.inf)).sum().item())

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


def accepts(space: Any) -> bool:
    """PyTorch tensors on any device (:func:`calibrate` declines what it cannot take)."""
    return bool(array_api_compat.is_torch_namespace(space.xp))


def calibrate(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
) -> Calibration:
    """The full :class:`Calibration` of one group (float32/float64 tensors, any device)."""
    device = torch.device(space.device)
    with torch.no_grad():
        return run_blocked(
            TorchOps(space.dtype, device), NAME, space, names, stats, lambdas, config, block_for(device)
        )


def calibrate_gradient(
    space: Any,
    names: Sequence[str],
    stats: Sequence[Any],
    lambdas: Sequence[float],
    config: CalibrationConfig,
    *,
    out: Any = None,
    segments: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
    native: bool = False,
) -> Any:
    """``calibrate(...).gradient`` alone, per segment (module :mod:`._gradient`).

    ``out``: a tensor of the statistics' shape, dtype and device that
    receives the gradient (returned); written only after every check passed.
    """
    shape, D = check_gradient_call(space, stats, config, segments, out)
    device = torch.device(space.device)
    dtype = space.dtype
    target = torch.empty(shape, dtype=dtype, device=device) if out is None else out
    contiguous = target.is_contiguous()
    flat = target.view(-1) if contiguous else torch.empty(D, dtype=dtype, device=device)
    counts: list[Any] = []
    for s in stats:
        c = s.count
        counts.append(float(c.reshape(-1)[0]) if c.numel() == 1 else c.expand(shape).reshape(-1))
    means = [s.mean.reshape(-1) for s in stats]
    m2s = [s.m2.reshape(-1) for s in stats]
    with torch.no_grad():
        if device.type == "cpu" and not native:
            # Zero-copy NumPy views: the NumPy engine's transcendentals are faster.
            with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
                gradient(
                    NumpyShim(),
                    names,
                    [m.numpy() for m in means],
                    [m.numpy() for m in m2s],
                    [c if isinstance(c, float) else c.numpy() for c in counts],
                    lambdas,
                    config,
                    flat.numpy(),
                    segments,
                    GRADIENT_BLOCK,
                    space.tiny,
                    dtype == torch.float32,
                    diagnostics,
                    threads=torch.get_num_threads(),
                )
        else:
            block = D if device.type != "cpu" else GRADIENT_BLOCK
            gradient(
                TorchShim(device),
                names,
                means,
                m2s,
                counts,
                lambdas,
                config,
                flat,
                segments,
                block,
                space.tiny,
                dtype == torch.float32,
                diagnostics,
            )
    if not contiguous:
        target.copy_(flat.view(shape))
    if diagnostics is not None:
        diagnostics["path"] = NAME
    return target
