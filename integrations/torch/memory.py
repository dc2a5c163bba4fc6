"""The default memory bound of one batch of gradient rows (``chunk_bytes``).

The generic per-example and micro-batch paths form ``R`` gradient rows of all
the parameters they cover in one batched backward pass, and the per-layer
formulas form per-example weight gradients in blocks; ``chunk_bytes`` bounds
each such batch. A bound below one row of the model means one backward pass
per example, so the default is sized from the model and from the memory free
on its device:

    chunk_bytes = max(64 MiB, min(16 * model_bytes, free_bytes / 8))

``model_bytes`` counts the parameters at their working precision (float32,
or float64 for float64 parameters), so 16 rows of the whole model fit in one
batch when the device has room for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["ROWS", "default_chunk_bytes", "free_bytes"]

ROWS = 16
FLOOR = 1 << 26


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: available physical pages)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def default_chunk_bytes(params: Iterable[torch.Tensor]) -> int:
    """``max(64 MiB, min(16 * model_bytes, free_bytes / 8))`` for the parameters ``params``."""
    ps = list(params)
    model = sum(p.numel() * (8 if p.dtype == torch.float64 else 4) for p in ps)
    want = ROWS * model
    free = free_bytes(ps[0].device) if ps else None
    if free is not None:
        want = min(want, free // 8)
    return int(max(FLOOR, want))
