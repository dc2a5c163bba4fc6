"""Statistics carried across steps (``samples="steps"`` or any ``rho``), and their checkpoint form.

Per source and parameter the state is the running ``GradientStats`` with
forgetting (METHOD.md, Stage 0): before merging a step's statistics,
``n <- rho n`` and ``M2 <- rho M2``. The calibration then uses the
accumulated count and ``M2`` (how noisy that source's gradient has been) with
the *current* step's mean, so that with equal evidence the update is this
step's plain gradient, as the training loop expects; smoothing the mean across
steps is left to the optimiser (momentum).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bogc_core import GradientStats
from bogc_core.errors import ConfigError

__all__ = ["StepState"]

Key = tuple[str, str]  # (source name, parameter name)


class StepState:
    """Running statistics keyed by ``(source, parameter name)``; updates are pure."""

    def __init__(self, rho: float) -> None:
        self.rho = float(rho)
        self.stats: dict[Key, GradientStats] = {}
        self.steps = 0

    def updated(self, new: Mapping[Key, GradientStats]) -> dict[Key, GradientStats]:
        """The state after merging ``new`` (nothing is modified; see :meth:`commit`)."""
        out = dict(self.stats)
        for key, st in new.items():
            old = out.get(key)
            out[key] = st if old is None else old.decay(self.rho).merge(st)
        return out

    def commit(self, stats: dict[Key, GradientStats]) -> None:
        self.stats = stats
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        nested: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for (src, name), st in self.stats.items():
            nested.setdefault(src, {})[name] = {
                "count": torch.as_tensor(st.count).detach().clone(),
                "mean": st.mean.detach().clone(),
                "m2": st.m2.detach().clone(),
            }
        return {"rho": self.rho, "steps": self.steps, "stats": nested}

    def load_state_dict(self, d: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        stats: dict[Key, GradientStats] = {}
        for src, per in d.get("stats", {}).items():
            for name, t in per.items():
                if name not in shapes:
                    raise ConfigError(
                        f"state_dict: statistics for unknown parameter {name!r} (source {src!r}); "
                        f"build the calibrator with the same parameters and names as when saving"
                    )
                if tuple(t["mean"].shape) != tuple(shapes[name]):
                    raise ConfigError(
                        f"state_dict: parameter {name!r} has shape {tuple(shapes[name])} but the "
                        f"saved statistics have {tuple(t['mean'].shape)}; load into the same model"
                    )
                stats[(src, name)] = GradientStats(
                    t["count"].clone(), t["mean"].clone(), t["m2"].clone()
                )
        self.stats = stats
        self.steps = int(d.get("steps", 0))
