"""``bogc_core.__all__`` is complete and documented.

Every public name of every stage module and of ``bogc_core.errors`` is
exported from ``bogc_core``; every exported name exists and appears in
``docs/api.md``; the same holds for ``bogc_core.testing``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import bogc_core
import bogc_core.testing

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _stage_modules():
    for info in pkgutil.iter_modules(bogc_core.__path__):
        if info.name.startswith("_"):
            yield importlib.import_module(f"bogc_core.{info.name}")


def test_every_stage_name_is_exported():
    exported = set(bogc_core.__all__)
    for mod in [*_stage_modules(), bogc_core.errors]:
        missing = set(getattr(mod, "__all__", ())) - exported
        assert not missing, (
            f"{mod.__name__} defines public {sorted(missing)} not in bogc_core.__all__"
        )


def test_every_exported_name_exists_and_is_unique():
    assert len(bogc_core.__all__) == len(set(bogc_core.__all__))
    for name in bogc_core.__all__:
        assert hasattr(bogc_core, name), name
    for name in bogc_core.testing.__all__:
        assert hasattr(bogc_core.testing, name), name


def test_every_exported_name_is_documented():
    text = API_MD.read_text()
    documented = set(re.findall(r"`(?:bogc_core\.(?:testing\.)?)?([A-Za-z_][A-Za-z0-9_]*)", text))
    missing = sorted((set(bogc_core.__all__) | set(bogc_core.testing.__all__)) - documented)
    assert not missing, f"not documented in docs/api.md: {missing}"


def test_no_submodule_is_shadowed_by_a_public_name():
    modules = {info.name for info in pkgutil.iter_modules(bogc_core.__path__)}
    clash = modules & set(bogc_core.__all__)
    assert not clash, clash
    assert callable(bogc_core.calibrate) and callable(bogc_core.evidence)
    assert callable(bogc_core.posterior)


def test_public_modules_are_only_the_documented_ones():
    public = {info.name for info in pkgutil.iter_modules(bogc_core.__path__)}
    # backends/ and integrations/ are mapped into bogc_core when installed
    public = {m for m in public if not m.startswith("_")} - {"backends", "integrations"}
    assert public == {"errors", "testing", "validate"}, public
