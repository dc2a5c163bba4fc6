"""bogc_core._namespace: one library, one device, one real floating dtype."""

from __future__ import annotations

import numpy as np
import pytest

import bogc_core as bc
from bogc_core.errors import (
    DTypeError,
    NamespaceError,
)


def test_mixed_namespaces():
    torch = pytest.importorskip("torch")
    a = bc.GradientStats.from_samples(np.ones((3, 2)) + np.arange(6.0).reshape(3, 2))
    b = bc.GradientStats.from_samples(
        torch.ones((3, 2), dtype=torch.float64)
        + torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    )
    with pytest.raises(NamespaceError, match=r"different libraries.*convert all inputs"):
        bc.calibrate([a, b])


def test_mixed_devices():
    xp = pytest.importorskip("array_api_strict")
    x = np.arange(6.0).reshape(3, 2)
    a = bc.GradientStats.from_samples(xp.asarray(x))
    b = bc.GradientStats.from_samples(xp.asarray(x, device=xp.Device("device1")))
    with pytest.raises(NamespaceError, match=r"different devices.*move all inputs"):
        bc.calibrate([a, b])


def test_mixed_and_integer_dtypes(ns):
    a = bc.GradientStats.from_samples(ns.asarray(np.arange(6.0).reshape(3, 2)))
    other = "float64" if ns.dtype_name == "float32" else "float32"
    if ns.name == "jax" and ns.dtype_name == "float32":
        other = "float16"  # without 64-bit mode JAX turns float64 into float32
    x = _cast(ns, other)  # GradientStats built directly: from_samples keeps float16 in float32
    b = bc.GradientStats(x[0, ...] * 0 + 3, x[0, ...], x[1, ...])
    with pytest.raises(DTypeError, match=r"mixed dtypes.*cast all inputs"):
        bc.calibrate([a, b])
    with pytest.raises(DTypeError, match=r"x: dtype .* is not real floating"):
        bc.GradientStats.from_samples(ns.xp.asarray([[1, 2], [3, 4]]))


def _cast(ns, dtype_name):
    from bogc_core.testing import Backend

    return Backend(ns.name).namespace(dtype_name).asarray(np.arange(6.0).reshape(3, 2) ** 2)


def test_not_an_array():
    with pytest.raises(NamespaceError, match=r"x: expected an array.*asarray"):
        bc.GradientStats.from_samples([[1.0, 2.0], [3.0, 4.0]])
