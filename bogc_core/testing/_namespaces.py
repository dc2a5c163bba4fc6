"""The table of array namespaces that the tests and ``bogc validate`` run on.

:class:`Backend` names each array library (and device) bogc is checked on;
:meth:`Backend.unavailable` says why one cannot run here (``None`` when it
can), :meth:`Backend.namespace` gives a :class:`Namespace`: how to make arrays
of that library from NumPy float64 data, read them back, and compare.
Nothing is imported until a backend is asked for.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

__all__ = ["Backend", "Namespace", "RTOL", "ATOL", "available_backends", "namespace_params"]

# Relative tolerances per dtype: float64 results agree to ~1e-12 with the
# oracle; float32 keeps ~6 digits through the logs and exps of the pipeline.
RTOL = {"float32": 2e-4, "float64": 1e-10}
ATOL = {"float32": 1e-6, "float64": 1e-12}


class Backend(enum.Enum):
    """An array library (and device) that bogc is checked on."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_CUDA = "torch:cuda"
    JAX = "jax"
    CUPY = "cupy"

    @property
    def module(self) -> str:
        """The library's top-level module."""
        return self.value.split(":")[0]

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or ``None`` (imports the library)."""
        try:
            mod = importlib.import_module(self.module)
            if self is Backend.TORCH_CUDA and not mod.cuda.is_available():
                return "torch installed but no CUDA device"
            if self is Backend.CUPY and mod.cuda.runtime.getDeviceCount() < 1:
                return "cupy installed but no CUDA device"
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
            if self is Backend.NUMPY:
                raise
            return f"{self.module} not usable: {type(exc).__name__}: {exc}".splitlines()[0][:160]
        return None

    def namespace(self, dtype: str = "float64") -> Namespace:
        """The :class:`Namespace` of this backend in ``dtype`` (``"float32"``/``"float64"``)."""
        return Namespace(self, dtype)


def available_backends(
    only: list[str] | None = None,
) -> tuple[list[Backend], dict[str, str]]:
    """Backends that run here, and ``{name: reason}`` for those that do not.

    ``only`` restricts the search to these names, so that unrequested
    libraries are not even imported.
    """
    found, missing = [], {}
    for b in Backend:
        if only is not None and b.value not in only:
            continue
        why = b.unavailable()
        if why is None:
            found.append(b)
        else:
            missing[b.value] = why
    return found, missing


def namespace_params(backends: list[Backend] | None = None) -> list[Any]:
    """One ``pytest.param(name)`` per backend (default: all but ``torch:cuda``), marked
    skip with the reason where it cannot run here. Imports pytest."""
    import pytest

    chosen = [b for b in Backend if b is not Backend.TORCH_CUDA] if backends is None else backends
    out = []
    for b in chosen:
        why = b.unavailable()
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(b.value, marks=marks, id=b.value))
    return out


def _from_dlpack(x: Any) -> np.ndarray:
    try:
        return np.asarray(np.from_dlpack(x), dtype=np.float64)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Namespace:
    """One backend in one dtype: make its arrays from NumPy data, read them back, compare.

    ``ns(a)`` / ``ns.asarray(a)`` turn array-likes (taken as float64) into
    arrays of the backend in ``dtype_name``; ``ns.to_numpy(x)`` reads one back
    as NumPy float64; ``ns.close(got, want)`` asserts agreement within the
    dtype's tolerance; ``ns.context()`` must be entered around any work in
    float64 on JAX (64-bit mode, scoped).
    """

    backend: Backend
    dtype_name: str

    @property
    def name(self) -> str:
        return self.backend.value

    @property
    def xp(self) -> Any:
        """The Array API namespace (array_api_compat's wrapper where there is one)."""
        b = self.backend
        if b is Backend.NUMPY:
            return importlib.import_module("array_api_compat.numpy")
        if b in (Backend.TORCH, Backend.TORCH_CUDA):
            return importlib.import_module("array_api_compat.torch")
        if b is Backend.CUPY:
            return importlib.import_module("array_api_compat.cupy")
        if b is Backend.JAX:
            return importlib.import_module("jax.numpy")
        return importlib.import_module("array_api_strict")

    @property
    def dtype(self) -> Any:
        return getattr(self.xp, self.dtype_name)

    @property
    def device(self) -> str | None:
        return "cuda" if self.backend is Backend.TORCH_CUDA else None

    @property
    def rtol(self) -> float:
        return RTOL[self.dtype_name]

    @property
    def atol(self) -> float:
        return ATOL[self.dtype_name]

    @property
    def array_type(self) -> type:
        b = self.backend
        if b is Backend.NUMPY:
            return np.ndarray
        if b in (Backend.TORCH, Backend.TORCH_CUDA):
            return cast(type, importlib.import_module("torch").Tensor)
        if b is Backend.CUPY:
            return cast(type, importlib.import_module("cupy").ndarray)
        if b is Backend.JAX:
            return cast(type, importlib.import_module("jax").Array)
        return type(self.xp.asarray(0.0))

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """64-bit mode around float64 work on JAX (the caller's setting is restored)."""
        if self.backend is Backend.JAX and self.dtype_name == "float64":
            jax = importlib.import_module("jax")
            switch = getattr(jax, "enable_x64", None)
            if switch is None:
                switch = getattr(importlib.import_module("jax.experimental"), "enable_x64", None)
            if switch is None:
                raise RuntimeError("this JAX has no enable_x64 context manager; use float32")
            with switch(True):
                yield
        else:
            yield

    def asarray(self, x: Any) -> Any:
        """``x`` (taken as float64) as an array of this namespace and dtype."""
        a = np.asarray(x, dtype=np.float64).astype(self.dtype_name)
        b = self.backend
        if b in (Backend.TORCH, Backend.TORCH_CUDA):
            torch = importlib.import_module("torch")
            return torch.as_tensor(a.copy(), device=self.device or "cpu")
        if b is Backend.CUPY:
            return importlib.import_module("cupy").asarray(a)
        return self.xp.asarray(a, dtype=self.dtype)

    __call__ = asarray
    make = asarray

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a NumPy float64 array (host copy)."""
        if isinstance(x, (int, float, np.generic, np.ndarray)):
            return np.asarray(x, dtype=np.float64)
        b = self.backend
        if b in (Backend.TORCH, Backend.TORCH_CUDA):
            return cast(np.ndarray, x.detach().cpu().numpy().astype(np.float64))
        if b is Backend.CUPY:
            return cast(np.ndarray, x.get().astype(np.float64))
        if b in (Backend.NUMPY, Backend.JAX):
            return np.asarray(x, dtype=np.float64)
        return _from_dlpack(x)

    def close(self, got: Any, want: Any, scale: float = 1.0, **kw: Any) -> None:
        """Assert ``got`` (any array) equals ``want`` within this dtype's tolerance x ``scale``."""
        got = got if isinstance(got, np.ndarray) else self.to_numpy(got)
        np.testing.assert_allclose(
            got,
            np.asarray(want, dtype=np.float64),
            rtol=kw.pop("rtol", None) or self.rtol * scale,
            atol=kw.pop("atol", None) or self.atol * scale,
            **kw,
        )


ArrayMaker = Callable[[np.ndarray], Any]
