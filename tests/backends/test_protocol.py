"""The fast-path module protocol: names, imports on demand, declining by ``Decline``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from bogc_core import CalibrationConfig, GradientStats
from bogc_core._namespace import resolve
from bogc_core._types import Decline

from .conftest import _cupy, _torch_cpu

MODULES = {
    "numpy_fused": ("numpy-fused", None),
    "torch_fused": ("torch-fused", _torch_cpu()),
    "cupy_fused": ("cupy-fused", _cupy()),
}


@pytest.mark.parametrize("module", list(MODULES))
def test_module_protocol(module):
    name, why = MODULES[module]
    if why:
        pytest.skip(why)
    mod = importlib.import_module(f"bogc_core.backends.{module}")
    assert mod.NAME == name
    for fn in ("accepts", "calibrate", "calibrate_gradient"):
        assert callable(getattr(mod, fn)), fn
    assert set(mod.__all__) <= set(dir(mod))


def test_package_imports_nothing(tmp_path):
    """Importing the package, or the NumPy fast path, imports no other array library."""
    code = (
        "import sys, bogc_core.backends, bogc_core.backends.numpy_fused as m;"
        "import numpy as np;"
        "from bogc_core import GradientStats, CalibrationConfig;"
        "from bogc_core._namespace import resolve;"
        "st=[GradientStats(np.asarray(4.0), np.ones(5)*(k+1), np.ones(5)) for k in range(2)];"
        "m.calibrate_gradient(resolve(st[0].mean), ['a','b'], st, [1.0, 1.0], CalibrationConfig());"
        "print(sorted(x for x in ('torch', 'cupy', 'jax') if x in sys.modules))"
    )
    # Run outside the checkout, so that the installed package is imported.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_accepts_by_array_type():
    from bogc_core.backends import numpy_fused

    space = resolve(np.ones(3))
    assert numpy_fused.accepts(space)
    if _torch_cpu() is None:
        import torch
        from bogc_core.backends import torch_fused

        assert torch_fused.accepts(resolve(torch.ones(3)))
        assert not torch_fused.accepts(space)
        assert not numpy_fused.accepts(resolve(torch.ones(3)))


def test_decline_is_raised_not_returned():
    from bogc_core.backends import numpy_fused

    st = [GradientStats(np.asarray(4.0, np.float16), np.ones(3, np.float16), np.ones(3, np.float16))]
    space = resolve(st[0].mean)
    for fn in (numpy_fused.calibrate, numpy_fused.calibrate_gradient):
        with pytest.raises(Decline, match="dtype"):
            fn(space, ["a"], st, [1.0], CalibrationConfig())
