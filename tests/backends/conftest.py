"""Backends under test: every registered fused path whose library and device exist.

``fused`` is parametrised over (backend name, array library, device). CUDA
paths (torch on CUDA, CuPy) are collected everywhere and skipped with a
reason when the library or a CUDA device is missing, so the same file runs
them on a GPU machine (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# Fused vs reference on the same inputs and dtype. float32 carries ~7 digits
# and the log score can reach |l| ~ 100 (extreme variances), so
# exp(gamma*(l - ref)) differs by up to ~gamma * eps * 200 relatively.
RTOL = {"float32": 3e-4, "float64": 1e-9}


def _cuda_torch() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    return None if torch.cuda.is_available() else "no CUDA device for torch"


def _cupy() -> str | None:
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "cupy installed but no CUDA device"
    except Exception as exc:  # noqa: BLE001 - import or driver failure both mean "unavailable"
        return f"cupy not usable: {type(exc).__name__}: {exc}"
    return None


def _torch_cpu() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch not installed"
    return None



def lib_array(lib: str, device: str, x: Any, dtype: str) -> Any:
    """A fresh ``dtype`` array of library ``lib`` on ``device`` (tests check inputs stay unmodified)."""
    x = np.array(x, dtype=dtype)
    if lib == "torch":
        import torch

        return torch.from_numpy(x).to(device)
    if lib == "cupy":
        import cupy

        return cupy.asarray(x)
    return x


def float64_numpy(lib: str, x: Any) -> np.ndarray:
    """``x`` of library ``lib`` as a float64 NumPy array."""
    if lib == "torch":
        return x.detach().cpu().numpy().astype(np.float64)
    if lib == "cupy":
        return x.get().astype(np.float64)
    return np.asarray(x, dtype=np.float64)

@dataclass
class Fused:
    """One fused path: how to move NumPy test data onto it and back."""

    name: str  # registered backend name
    lib: str  # "numpy", "torch", "cupy"
    device: str = "cpu"

    def asarray(self, x: Any, dtype: str) -> Any:
        return lib_array(self.lib, self.device, x, dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return float64_numpy(self.lib, x)


def _params() -> list[Any]:
    out = []
    for fused, why in [
        (Fused("numpy-fused", "numpy"), None),
        (Fused("torch-fused", "torch", "cpu"), _torch_cpu()),
        (Fused("torch-fused", "torch", "cuda"), _cuda_torch()),
        (Fused("cupy-fused", "cupy", "cuda"), _cupy()),
    ]:
        marks = [pytest.mark.skip(reason=why)] if why else []
        if fused.device == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(fused, marks=marks, id=f"{fused.name}-{fused.device}"))
    return out


@pytest.fixture(params=_params())
def fused(request: Any) -> Fused:
    return request.param


@pytest.fixture(params=["float32", "float64"])
def dtype(request: Any) -> str:
    return request.param
