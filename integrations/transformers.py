"""BOGC in the Hugging Face ``transformers.Trainer``: :class:`BOGCTrainer`.

The model's forward returns, next to its usual outputs, the per-example loss
of every source (a fusion loss plus one per modality, say) under one key,
``"losses"`` by default::

    return {"loss": total, "logits": fused_logits,
            "losses": {"fusion": ce(fused_logits, y),   # (batch,), reduction="none"
                       "audio": ce(audio_logits, y),
                       "image": ce(image_logits, y)}}

(a ``dict`` or a ``transformers.utils.ModelOutput`` with a ``losses`` field).
:class:`BOGCTrainer` then replaces the Trainer's ``loss.backward()`` with
``GradientCalibrator.backward(losses)``:
every parameter reached by two or more sources gets the calibrated gradient
``g_hat`` of ``docs/method.md`` (Stage 5), the others the plain sum of their
sources' gradients. Gradient clipping (``max_grad_norm``), the optimizer, the
learning-rate schedule, logging and evaluation stay the Trainer's.

The loss the Trainer logs and evaluates is the plain sum of the sources' mean
losses, ``sum_k mean(losses[k])``.

Limits: one process (multi-process runs, DeepSpeed and FSDP are refused; the
plain ``GradientCalibrator`` loop handles distributed training);
``gradient_accumulation_steps`` must be 1 (the calibrator replaces ``p.grad``
each step; raise the batch size instead); ``fp16`` (a loss scaler) is
refused, ``bf16`` works.
Statistics carried across steps (``samples="steps"`` or a ``rho``) are not
written into the Trainer's checkpoints; use
``trainer.calibrator.state_dict()`` for that.

Needs the ``transformers`` extra: ``pip install "bogc[torch,transformers]"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError, ShapeError

from .torch import GradientCalibrator

__all__ = ["BOGCTrainer", "source_losses"]


def source_losses(outputs: Any, key: str = "losses") -> dict[str, torch.Tensor]:
    """The per-source per-example losses of a model's output, checked.

    ``outputs[key]`` must map source names to loss tensors of shape
    ``(batch,)`` (``reduction="none"``). Raises :class:`ConfigError` naming
    ``key`` when it is missing or not such a mapping.
    """
    found = None
    if isinstance(outputs, Mapping):
        found = outputs.get(key)
    elif hasattr(outputs, key):
        found = getattr(outputs, key)
    if found is None:
        raise ConfigError(
            f"outputs[{key!r}]: the model's output has no per-source losses under {key!r}; make "
            f"forward return {{{key!r}: {{source: per-example loss (batch,)}}, ...}} (losses with "
            f"reduction='none'), or pass losses_key= to BOGCTrainer"
        )
    if not isinstance(found, Mapping) or not found:
        raise ConfigError(
            f"outputs[{key!r}]: must be a non-empty mapping source name -> per-example loss "
            f"tensor, got {type(found).__name__}"
        )
    losses: dict[str, torch.Tensor] = {}
    for name, loss in found.items():
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(f"outputs[{key!r}][{name!r}]: must be a torch.Tensor, got "
                              f"{type(loss).__name__}")
        losses[str(name)] = loss
    return losses


def _plain_total(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    means = [v.mean() for v in losses.values() if v.numel() > 0]
    if not means:
        raise ShapeError("losses: every source's loss is empty; feed a non-empty batch")
    return torch.stack(means).sum()


class BOGCTrainer(Trainer):
    """A ``transformers.Trainer`` whose backward pass is BOGC's calibrated gradient.

    The calibrator is built at the first training step, over the trainable
    parameters of the model; it is ``trainer.calibrator`` afterwards, and the
    diagnostics of the last step are ``trainer.last_diagnostics``.

    Parameters
    ----------
    *args, **kwargs
        Passed to ``transformers.Trainer``.
    bogc_config : CalibrationConfig, optional (keyword)
        Options of the method (``docs/method.md``); default ``CalibrationConfig()``.
    samples : {"microbatch", "per_example", "laplace", "steps"} (keyword)
        Where the gradient samples come from (see ``GradientCalibrator``).
    losses_key : str (keyword)
        Key (or attribute) of the model output that holds the per-source losses.
    calibrator_kwargs : mapping, optional (keyword)
        More keyword arguments of ``GradientCalibrator`` (``chunks``, ``rho``,
        ``source_weights``, ``diagnostics``...).
    """

    def __init__(
        self,
        *args: Any,
        bogc_config: CalibrationConfig | None = None,
        samples: str = "microbatch",
        losses_key: str = "losses",
        calibrator_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if bogc_config is not None and not isinstance(bogc_config, CalibrationConfig):
            raise ConfigError(f"bogc_config: expected a CalibrationConfig, got "
                              f"{type(bogc_config).__name__}")
        if self.args.gradient_accumulation_steps != 1:
            raise ConfigError(
                f"args.gradient_accumulation_steps: must be 1 with BOGCTrainer (the calibrated "
                f"gradient replaces p.grad each step), got {self.args.gradient_accumulation_steps}; "
                f"raise per_device_train_batch_size instead"
            )
        if self.args.fp16:
            raise ConfigError("args.fp16: a loss scaler is not supported by BOGCTrainer; use "
                              "bf16=True or full precision")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ConfigError("args: DeepSpeed and FSDP are not supported by BOGCTrainer; train "
                              "in one process")
        if self.args.world_size > 1:
            # The Trainer would wrap the model in DistributedDataParallel, whose gradient
            # hooks expect loss.backward(); the calibrator all-reduces statistics itself
            # in a plain training loop (docs/integrations.md) instead.
            raise ConfigError(
                f"args.world_size: BOGCTrainer runs in one process, got {self.args.world_size} "
                f"processes; for multi-process training use GradientCalibrator in a plain loop"
            )
        self.bogc_config = bogc_config or CalibrationConfig()
        self.samples = samples
        self.losses_key = losses_key
        self.calibrator_kwargs = dict(calibrator_kwargs or {})
        self.calibrator: GradientCalibrator | None = None
        self.last_diagnostics: dict[str, Any] = {}

    def _calibrator_for(self, model: nn.Module) -> GradientCalibrator:
        if self.calibrator is None:
            unwrapped = self.accelerator.unwrap_model(model)
            params = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
            self.calibrator = GradientCalibrator(params, self.bogc_config, samples=self.samples,
                                                 **self.calibrator_kwargs)
        return self.calibrator

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``sum_k mean(losses[k])`` (for logging and evaluation) and, if asked, the outputs."""
        outputs = model(**inputs)
        loss = _plain_total(source_losses(outputs, self.losses_key))
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """Forward, then ``GradientCalibrator.backward(losses)``; returns the detached plain loss."""
        model.train()
        train_mode = getattr(self.optimizer, "train", None)  # schedule-free optimizers have modes
        if callable(train_mode):
            train_mode()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = source_losses(outputs, self.losses_key)
        calibrator = self._calibrator_for(model)
        self.last_diagnostics = calibrator.backward(losses)
        return _plain_total({k: v.detach() for k, v in losses.items()})
