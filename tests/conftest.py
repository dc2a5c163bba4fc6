"""Shared fixtures: the array namespaces every core test runs on.

``ns`` is parametrised over every Array API library that can be imported
(NumPy always; PyTorch CPU, array-api-strict; CuPy only with a CUDA device,
skipped with a reason otherwise), and ``dtype_name`` over float32/float64.
Tests build inputs in NumPy float64 and move them with ``ns.asarray``; results
come back with ``ns.to_numpy`` so the oracle is always plain NumPy.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from nstools import Namespace  # noqa: E402


def _available() -> list[Any]:
    params = []
    for name, module in [
        ("numpy", "numpy"),
        ("array_api_strict", "array_api_strict"),
        ("torch", "torch"),
        ("cupy", "cupy"),
    ]:
        marks: list[Any] = []
        try:
            mod = importlib.import_module(module)
            if name == "cupy" and mod.cuda.runtime.getDeviceCount() < 1:
                marks = [pytest.mark.skip(reason="cupy installed but no CUDA device")]
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            if name in ("numpy",):
                raise
            marks = [pytest.mark.skip(reason=f"{module} not importable: {exc}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _xp(name: str) -> Any:
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    elif name == "cupy":
        import array_api_compat.cupy as xp
    else:
        import array_api_strict as xp
    return xp


@pytest.fixture(params=_available())
def ns_name(request: Any) -> str:
    return request.param


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request: Any) -> str:
    return request.param


@pytest.fixture
def ns(ns_name: str, dtype_name: str) -> Namespace:
    return Namespace(ns_name, _xp(ns_name), dtype_name)


@pytest.fixture
def ns64(ns_name: str) -> Namespace:
    return Namespace(ns_name, _xp(ns_name), "float64")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
