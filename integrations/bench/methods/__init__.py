"""Training methods of ``bogc bench``: BOGC, its variants and the baselines, one module each."""

from .base import Method
from .registry import ABLATIONS, MAIN_METHODS, METHODS, SEARCH, build, configured, expand

__all__ = ["ABLATIONS", "MAIN_METHODS", "METHODS", "Method", "SEARCH", "build", "configured", "expand"]
