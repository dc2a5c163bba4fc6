"""Experiment harness of ``bogc bench``: model, methods (BOGC and baselines), settings, metrics.

- :mod:`.model`: :class:`MultiModalNet` (encoder per modality, fusion head, unimodal heads).
- :mod:`.base`: the :class:`Method` interface; one module per method
  (:mod:`.summed`, :mod:`.bogc_method`, :mod:`.pcgrad`, :mod:`.mgda`,
  :mod:`.mmpareto`, :mod:`.ogm_ge`); :mod:`.registry` maps names to them.
- :mod:`.settings`: standard / missing / fewshot / noisy splits.
- :mod:`.harness`: the training loop, multi-seed runs and validation tuning.
- :mod:`.metrics`: accuracy, macro-F1, paired t confidence intervals.
"""

from .base import Method
from .harness import TrainConfig, train_run, tune
from .metrics import accuracy, macro_f1, paired_difference
from .model import MultiModalNet
from .registry import METHODS, build, expand
from .settings import SETTINGS, make_split

__all__ = [
    "METHODS",
    "Method",
    "MultiModalNet",
    "SETTINGS",
    "TrainConfig",
    "accuracy",
    "build",
    "expand",
    "macro_f1",
    "make_split",
    "paired_difference",
    "train_run",
    "tune",
]
