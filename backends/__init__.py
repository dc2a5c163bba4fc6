"""Fused fast paths of the calibration pipeline, one module per array library.

Importing this package registers every backend whose array library is
installed with :mod:`bogc_core.dispatch`. Each is tested equal to the
reference in ``tests/backends``.
"""
