"""Deprecated location of the float64 oracle: use ``bogc_core.testing.oracle``."""

from bogc_core.testing._oracle import *  # noqa: F403
from bogc_core.testing._oracle import __all__  # noqa: F401
