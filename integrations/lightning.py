"""PyTorch Lightning: BOGC in ``LightningModule.training_step``.

:class:`BOGCCallback` owns a
:class:`~bogc_core.integrations.torch.GradientCalibrator` over the module's
parameters: it builds it when fitting starts, saves and restores its state in
checkpoints, and logs the calibration diagnostics. The module hands its
per-example losses to it in one of two ways:

- manual optimisation (``self.automatic_optimization = False``): call
  :func:`calibrated_backward` where ``self.manual_backward(loss)`` would go;
- automatic optimisation: inherit :class:`BOGCModule` and return
  ``self.bogc_loss(losses)`` from ``training_step``; its ``backward`` hook
  runs the calibrated backward instead of ``loss.backward()``.

Either way ``p.grad`` holds the calibrated gradient when the optimiser steps.
With 16-bit mixed precision the trainer's ``GradScaler`` is passed on, so
the statistics are of unscaled gradients and ``p.grad`` is written scaled for
the scaler's ``unscale_``/``step``. Gradient accumulation over batches
(``accumulate_grad_batches > 1``) is refused: the calibrator replaces
``p.grad`` rather than adding to it.

Example (manual optimisation)::

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            ...

        def training_step(self, batch, batch_idx):
            losses = {"fusion": ..., "audio": ...}   # per-example, reduction="none"
            opt = self.optimizers()
            opt.zero_grad()
            calibrated_backward(self, losses)
            opt.step()

    trainer = L.Trainer(callbacks=[BOGCCallback(samples=Microbatch(chunks=4))])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from bogc_core.integrations.torch import GradientCalibrator
from bogc_core.integrations.torch.source import SampleSource

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["BOGCCallback", "BOGCModule", "calibrated_backward", "find_callback"]

# Scalars of GradientCalibrator.backward's diagnostics worth a line in the logger.
_LOGGED = ("fused_uncertainty_mean", "belief_scale_min", "belief_scale_max")
_LOGGED_PER_SOURCE = ("weight_mean", "evidence_mean")


class BOGCCallback(pl.Callback):
    """Builds and keeps the :class:`GradientCalibrator` of a ``LightningModule``.

    Parameters
    ----------
    config, samples, source_weights :
        Passed to :class:`~bogc_core.integrations.torch.GradientCalibrator`
        (defaults: those of ``docs/method.md``, ``samples="microbatch"``,
        that is ``Microbatch(chunks=4)``; the sample source carries its own
        options, ``rho`` included).
    params : callable, optional
        ``params(module)`` returns the parameters to calibrate, as parameters
        or ``(name, parameter)`` pairs; default every parameter that requires
        a gradient, by name.
    log_diagnostics : bool
        Log ``bogc/...`` scalars (fused uncertainty, belief-scale range, mean
        weight and evidence per source) after every training batch.
    **calibrator_kwargs :
        Any other keyword of ``GradientCalibrator`` (``diagnostics``,
        ``on_nonfinite``, ``model``). ``model`` defaults to the
        ``LightningModule``, so that its layers take the per-layer formulas (as
        ``BOGCTrainer`` does); ``model=None`` turns them off, for a module whose
        examples' losses depend on each other's rows (batch norm).
        ``distributed`` is refused: the callback calibrates on one process.

    Attributes
    ----------
    calibrator : GradientCalibrator or None
        Built at ``on_fit_start``.
    last_diagnostics : dict or None
        What the last calibrated backward returned.
    """

    def __init__(
        self,
        config: CalibrationConfig | None = None,
        samples: SampleSource | str = "microbatch",
        source_weights: Mapping[str, float] | None = None,
        params: Callable[[torch.nn.Module], Iterable[Any]] | None = None,
        log_diagnostics: bool = True,
        **calibrator_kwargs: Any,
    ) -> None:
        super().__init__()
        if "distributed" in calibrator_kwargs:
            raise ConfigError(
                "calibrator_kwargs: 'distributed' is not supported by BOGCCallback, which "
                "calibrates on one process; leave it out, or use GradientCalibrator with "
                "Distributed() in your own loop"
            )
        model = calibrator_kwargs.get("model", True)
        if model is not None and model is not True and not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"model: None (no per-layer formulas) or an nn.Module, got {type(model).__name__}; "
                f"leave it out to use the LightningModule"
            )
        self.kwargs = dict(
            config=config,
            samples=samples,
            source_weights=source_weights,
            **calibrator_kwargs,
        )
        self.params = params
        self.log_diagnostics = log_diagnostics
        self.calibrator: GradientCalibrator | None = None
        self.last_diagnostics: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._unlogged: dict[str, Any] | None = None

    # ------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"accumulate_grad_batches: {trainer.accumulate_grad_batches}, but BOGC replaces "
                f"p.grad with one calibrated gradient per step; use accumulate_grad_batches=1 "
                f"and a larger batch, or samples=Steps(rho=...) to pool statistics over steps"
            )
        params = (
            self.params(pl_module)
            if self.params is not None
            else [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        )
        kw = dict(self.kwargs)
        if kw.get("model", True) is True:
            kw["model"] = pl_module
        self.calibrator = GradientCalibrator(params, **kw)
        if self._pending_state is not None:
            self.calibrator.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.calibrator is not None:
            self.calibrator.remove_hooks()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        diag, self._unlogged = self._unlogged, None
        if not self.log_diagnostics or not diag or diag.get("nonfinite"):
            return
        values: dict[str, float] = {}
        for key in _LOGGED:
            if isinstance(diag.get(key), (int, float)):
                values[f"bogc/{key}"] = float(diag[key])
        for key in _LOGGED_PER_SOURCE:
            for source, v in (diag.get(key) or {}).items():
                values[f"bogc/{key}/{source}"] = float(v)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {} if self.calibrator is None else {"calibrator": self.calibrator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("calibrator")
        if saved is None:
            return
        # Lightning restores callback state before on_fit_start builds the calibrator.
        if self.calibrator is None:
            self._pending_state = saved
        else:
            self.calibrator.load_state_dict(saved)

    # ------------------------------------------------------------- backward
    def backward(self, trainer: pl.Trainer, losses: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Run the calibrated backward for ``losses``; returns its diagnostics."""
        if self.calibrator is None:
            raise ConfigError(
                "losses: the calibrated backward ran before the fit started; call it from "
                "training_step (BOGCCallback builds the calibrator in on_fit_start)"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        diag = self.calibrator.backward(losses, grad_scaler=scaler)
        self.last_diagnostics = self._unlogged = diag
        return diag


def find_callback(module: pl.LightningModule) -> BOGCCallback:
    """The :class:`BOGCCallback` of the trainer ``module`` is attached to."""
    trainer = getattr(module, "_trainer", None)
    found = [] if trainer is None else [c for c in trainer.callbacks if isinstance(c, BOGCCallback)]
    if len(found) != 1:
        raise ConfigError(
            f"callbacks: found {len(found)} BOGCCallback in the trainer; pass exactly one, "
            f"Trainer(callbacks=[BOGCCallback(...)])"
        )
    return found[0]


def calibrated_backward(
    module: pl.LightningModule, losses: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Calibrated replacement for ``module.manual_backward(loss)`` (manual optimisation).

    ``losses`` maps a source name to its per-example losses ``(batch,)``
    (``reduction="none"``; a scalar with ``samples="steps"``). Sets ``p.grad``
    of the calibrated parameters and returns the diagnostics. Refused in a
    module with automatic optimisation, as ``manual_backward`` is: there
    Lightning would step on the gradient of the returned total instead (or,
    when ``training_step`` returns ``None``, never step at all).
    """
    if getattr(module, "automatic_optimization", False):
        raise ConfigError(
            "module: calibrated_backward needs manual optimisation; set "
            "self.automatic_optimization = False in the module's __init__ (as "
            "manual_backward does), or keep automatic optimisation, inherit BOGCModule and "
            "return self.bogc_loss(losses) from training_step"
        )
    return find_callback(module).backward(module.trainer, losses)


class BOGCModule(pl.LightningModule):
    """Mixin for automatic optimisation: ``training_step`` returns ``self.bogc_loss(losses)``.

    :meth:`bogc_loss` keeps the per-example losses and returns their plain
    total ``sum_k mean(loss_k)`` (what progress bars and loggers show); the
    :meth:`backward` hook then runs the calibrated backward on the kept losses
    instead of differentiating that total.
    """

    _bogc_losses: Mapping[str, torch.Tensor] | None = None

    def bogc_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Keep ``losses`` for the backward hook; return ``sum_k losses[k].mean()``."""
        if not isinstance(losses, Mapping) or not losses:
            raise ConfigError(
                "losses: expected a non-empty mapping source name -> per-example loss tensor"
            )
        self._bogc_losses = dict(losses)
        return sum((v.mean() for v in losses.values()), torch.zeros((), device=self.device))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        kept, self._bogc_losses = self._bogc_losses, None
        if kept is None:
            # training_step did not go through bogc_loss: a plain backward.
            super().backward(loss, *args, **kwargs)
            return
        find_callback(self).backward(self.trainer, kept)
