"""Shared fixtures: the array namespaces every core test runs on.

``ns`` is parametrised over every Array API library that can be imported
(NumPy always; PyTorch CPU, array-api-strict; CuPy only with a CUDA device,
skipped with a reason otherwise), and ``dtype_name`` over float32/float64.
Tests build inputs in NumPy float64 and move them with ``ns.asarray``; results
come back with ``ns.to_numpy`` so the oracle is always plain NumPy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from nstools import Namespace, array_namespace, available_namespaces

# CI runs the property tests derandomized, so a result never depends on the
# draw; locally they explore new examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=available_namespaces())
def ns_name(request: Any) -> str:
    return request.param


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request: Any) -> str:
    return request.param


def _namespace(name: str, dtype_name: str) -> Any:
    if name == "jax" and dtype_name == "float64":
        import jax

        # JAX computes in float32 unless 64-bit mode is on; scope it to the test.
        with jax.enable_x64(True):
            yield Namespace(name, array_namespace(name), dtype_name)
    else:
        yield Namespace(name, array_namespace(name), dtype_name)


@pytest.fixture
def ns(ns_name: str, dtype_name: str) -> Any:
    yield from _namespace(ns_name, dtype_name)


@pytest.fixture
def ns64(ns_name: str) -> Any:
    yield from _namespace(ns_name, "float64")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
