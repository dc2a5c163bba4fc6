"""Fast paths of the calibration, one module per array library.

Importing this package imports nothing: the core imports a fast-path module
by name, on demand, once it knows the array type (a NumPy call never imports
PyTorch or CuPy); the table of modules is ``bogc_core._dispatch.FAST_PATHS``.
Every module binds one :class:`._adapter.Adapter` (a name, an ``accepts``
test and the engine's operations for its library) as the protocol:

- ``NAME``: the fast path's name (``CalibrationConfig(fast_path=NAME)``);
- ``accepts(space) -> bool``: whether it takes arrays of this namespace and device;
- ``calibrate(space, names, stats, lambdas, config) -> Calibration``;
- ``calibrate_gradient(space, names, stats, lambdas, config, *, out=None,
  segments=None, diagnostics=None) -> array``;

and declines an input by raising :class:`bogc_core._types.Decline`. All of
them run one engine (:mod:`._gradient`, with the compiled CPU loops of
:mod:`._numba_kernel`) through one :func:`._adapter.run`. Each is tested
equal to the reference in ``tests/backends``.

| module            | arrays                              |
|-------------------|-------------------------------------|
| ``numpy_fused``   | NumPy float32/float64               |
| ``torch_fused``   | PyTorch float32/float64, CPU, CUDA  |
| ``cupy_fused``    | CuPy float32/float64                |
"""
