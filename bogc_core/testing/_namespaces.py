"""Array-namespace helpers shared by the tests (importable: ``tests/`` is on pytest's pythonpath)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# Relative tolerances per dtype: float64 results agree to ~1e-12 with the
# oracles; float32 keeps ~6 digits through logs/exps of the pipeline.
RTOL = {"float32": 2e-4, "float64": 1e-10}
ATOL = {"float32": 1e-6, "float64": 1e-12}


@dataclass
class Namespace:
    name: str
    xp: Any
    dtype_name: str

    @property
    def dtype(self) -> Any:
        return getattr(self.xp, self.dtype_name)

    @property
    def rtol(self) -> float:
        return RTOL[self.dtype_name]

    @property
    def atol(self) -> float:
        return ATOL[self.dtype_name]

    def asarray(self, x: Any) -> Any:
        x = np.asarray(x, dtype=np.float64).astype(self.dtype_name)
        if self.name == "torch":
            import torch

            return torch.from_numpy(x.copy())
        if self.name == "cupy":
            import cupy

            return cupy.asarray(x)
        return self.xp.asarray(x, dtype=self.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "torch":
            return x.detach().cpu().numpy().astype(np.float64)
        if self.name == "cupy":
            return x.get().astype(np.float64)
        if self.name in ("numpy", "jax") or isinstance(x, (int, float, np.generic)):
            return np.asarray(x, dtype=np.float64)
        return np.from_dlpack(x).astype(np.float64)

    def close(self, got: Any, want: Any, scale: float = 1.0, **kw: Any) -> None:
        got = self.to_numpy(got) if not isinstance(got, np.ndarray) else got
        np.testing.assert_allclose(
            got,
            np.asarray(want, dtype=np.float64),
            rtol=kw.pop("rtol", None) or self.rtol * scale,
            atol=kw.pop("atol", None) or self.atol * scale,
            **kw,
        )


def available_namespaces() -> list[Any]:
    params = []
    for name, module in [
        ("numpy", "numpy"),
        ("array_api_strict", "array_api_strict"),
        ("torch", "torch"),
        ("jax", "jax"),
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


def array_namespace(name: str) -> Any:
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    elif name == "cupy":
        import array_api_compat.cupy as xp
    elif name == "jax":
        import jax.numpy as xp
    else:
        import array_api_strict as xp
    return xp
