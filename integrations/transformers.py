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

The calibrator gets the model (``model=``), so Linear (inputs of any rank),
Embedding, LayerNorm and Conv2d layers take their statistics from the
per-layer formulas of ``GradientCalibrator`` (one backward per source, no
backward per example); ``calibrator_kwargs={"model": None}`` turns that off.

On every logging step the calibrator samples its diagnostics and they go into
the Trainer's logs (``trainer.state.log_history``, and every ``report_to``
integration) as ``bogc/<name>`` floats: ``bogc/weight_mean/<source>`` (the
source's mean BOGC weight over the dimensions it reaches),
``bogc/evidence_mean/<source>``, ``bogc/fused_uncertainty_mean``,
``bogc/belief_scale_min``/``max`` and the counts ``bogc/num_reached``,
``bogc/num_calibrated``. Every Trainer checkpoint holds the calibrator's
state (``bogc_calibrator.pt``: carried statistics with ``rho`` or
``samples="steps"``, and the random generator), and
``train(resume_from_checkpoint=...)`` restores it, so a resumed run takes the
steps the uninterrupted one would. The ``losses`` entry is left out of the
predictions of ``evaluate``/``predict``.

Limits: one process (multi-process runs, DeepSpeed and FSDP are refused; the
plain ``GradientCalibrator`` loop handles distributed training);
``gradient_accumulation_steps`` must be 1 (the calibrator replaces ``p.grad``
each step; raise the batch size instead); ``fp16`` (a loss scaler) is
refused, ``bf16`` works. Activation (gradient) checkpointing works in its
non-reentrant form (the default); the reentrant form is refused, because its
blocks' parameters are reached only by autograd's own backward pass.

Needs the ``transformers`` extra: ``pip install "bogc[torch,transformers]"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError, ShapeError

from .torch import Diagnostics, GradientCalibrator
from .torch.source import SampleSource

__all__ = ["CALIBRATOR_FILE", "BOGCTrainer", "log_entries", "source_losses"]

#: The calibrator's state inside each Trainer checkpoint folder.
CALIBRATOR_FILE = "bogc_calibrator.pt"

logger = logging.get_logger(__name__)


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


def log_entries(diagnostics: Mapping[str, Any]) -> dict[str, float]:
    """``bogc/<name>`` floats of :meth:`GradientCalibrator.backward`'s diagnostics, for logs.

    Counts always; the sampled means (per source: ``weight_mean``,
    ``evidence_mean``, ``dimensions``) and the fused uncertainty and
    belief-scale range when the step was sampled.
    """
    out: dict[str, float] = {}
    for key in ("num_reached", "num_calibrated", "num_single_source", "warmup", "nonfinite"):
        if key in diagnostics:
            out[f"bogc/{key}"] = float(diagnostics[key])
    for key in ("weight_mean", "evidence_mean", "dimensions"):
        for src, v in (diagnostics.get(key) or {}).items():
            out[f"bogc/{key}/{src}"] = float(v)
    for key in ("fused_uncertainty_mean", "belief_scale_min", "belief_scale_max"):
        if key in diagnostics:
            out[f"bogc/{key}"] = float(diagnostics[key])
    return out


def _reentrant(args: Any) -> bool:
    """The Trainer will checkpoint activations in the reentrant form."""
    on = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    if not on:
        return False
    kw = (getattr(args, "activation_checkpointing_kwargs", None)
          or getattr(args, "gradient_checkpointing_kwargs", None) or {})
    return isinstance(kw, Mapping) and bool(kw.get("use_reentrant", False))


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
    samples : SampleSource or {"microbatch", "per_example", "steps"} (keyword)
        Where the gradient samples come from, with its options
        (``Microbatch(chunks=4)``, ``PerExample()``, ``Laplace(layers=...)``,
        ``Steps()``; see ``GradientCalibrator``).
    losses_key : str (keyword)
        Key (or attribute) of the model output that holds the per-source losses.
    calibrator_kwargs : mapping, optional (keyword)
        More keyword arguments of ``GradientCalibrator`` (``source_weights``,
        ``diagnostics``, ``on_nonfinite``). ``model`` defaults to the
        Trainer's model (per-layer statistics); ``diagnostics=Diagnostics(every=k)``
        adds a sampled step every ``k`` steps to the logging steps.
    """

    def __init__(
        self,
        *args: Any,
        bogc_config: CalibrationConfig | None = None,
        samples: SampleSource | str = "microbatch",
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
        if _reentrant(self.args):
            raise ConfigError(
                "args.gradient_checkpointing_kwargs: use_reentrant=True hides each checkpointed "
                "block's parameters from the calibrator (only autograd's own backward reaches "
                "them); pass {'use_reentrant': False} (activation_checkpointing_kwargs in "
                "transformers >= 5), which saves the same memory"
            )
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
        self._bogc_logs: dict[str, float] = {}
        self._bogc_resume: dict[str, Any] | None = None

    def _calibrator_for(self, model: nn.Module) -> GradientCalibrator:
        if self.calibrator is None:
            unwrapped = self.accelerator.unwrap_model(model)
            params = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
            kw = dict(self.calibrator_kwargs)
            kw.setdefault("model", unwrapped)
            self.calibrator = GradientCalibrator(params, self.bogc_config, samples=self.samples, **kw)
        if self._bogc_resume is not None:
            self.calibrator.load_state_dict(self._bogc_resume)
            self._bogc_resume = None
        return self.calibrator

    def _logs_next_step(self) -> bool | None:
        """Whether the step about to run is a logging step (``None``: not known in advance)."""
        args = self.args
        step = self.state.global_step + 1
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return None
        every = self.state.logging_steps or args.logging_steps
        return bool((args.logging_first_step and step == 1) or (every and step % every == 0))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus the ``bogc/`` entries of the last sampled step on training logs."""
        if "loss" in logs and self._bogc_logs:
            logs = {**logs, **self._bogc_logs}
            self._bogc_logs = {}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.calibrator is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.calibrator.state_dict(), os.path.join(folder, CALIBRATOR_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, CALIBRATOR_FILE)
        if not os.path.isfile(path):
            logger.warning(
                f"{resume_from_checkpoint} holds no {CALIBRATOR_FILE}: the calibrator starts afresh "
                f"(statistics carried by rho or samples='steps' restart from zero)"
            )
            return
        self._bogc_resume = torch.load(path, map_location="cpu", weights_only=True)
        if self.calibrator is not None:  # a second train() on the same Trainer
            self.calibrator.load_state_dict(self._bogc_resume)
            self._bogc_resume = None

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The Trainer's, with the per-source ``losses`` left out of the predictions."""
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", None) or [])
        if self.losses_key not in ignore_keys:
            ignore_keys = [*ignore_keys, self.losses_key]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

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
        logs_next = self._logs_next_step()
        # Sample the diagnostics on logging steps; elsewhere only if Diagnostics(every=) asks.
        scheduled = isinstance(self.calibrator_kwargs.get("diagnostics"), Diagnostics)
        force = logs_next if logs_next or not scheduled else None
        self.last_diagnostics = calibrator.backward(losses, sample_diagnostics=force)
        if self.last_diagnostics.get("sampled") or logs_next:
            self._bogc_logs = log_entries(self.last_diagnostics)
        return _plain_total({k: v.detach() for k, v in losses.items()})
