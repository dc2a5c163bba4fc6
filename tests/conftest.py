"""Shared fixtures: the array namespaces every core test runs on.

``ns`` is parametrised over the backends of :class:`bogc_core.testing.Backend`
that run on the CPU or a present device (NumPy always; array-api-strict,
PyTorch CPU, JAX; CuPy only with a CUDA device, skipped with the reason
otherwise), and ``dtype_name`` over float32/float64. Tests build inputs in
NumPy float64 and move them with ``ns.asarray``; results come back with
``ns.to_numpy`` so the oracle (``bogc_core.testing.oracle``) is always plain
NumPy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from bogc_core.testing import Backend, Namespace, namespace_params

# CI runs the property tests derandomized, so a result never depends on the
# draw; locally they explore new examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# torch:cuda is left to the fast-path tests (tests/backends): the core's
# reference code is the same on every torch device.
@pytest.fixture(params=namespace_params())
def ns_name(request: Any) -> str:
    return str(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request: Any) -> str:
    return str(request.param)


def _namespace(name: str, dtype_name: str) -> Iterator[Namespace]:
    ns = Backend(name).namespace(dtype_name)
    with ns.context():
        yield ns


@pytest.fixture
def ns(ns_name: str, dtype_name: str) -> Iterator[Namespace]:
    yield from _namespace(ns_name, dtype_name)


@pytest.fixture
def ns64(ns_name: str) -> Iterator[Namespace]:
    yield from _namespace(ns_name, "float64")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
