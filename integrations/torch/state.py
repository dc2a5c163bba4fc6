"""Statistics carried across steps (``samples="steps"`` or any ``rho``), and their checkpoint form.

Per source and parameter the state is the running ``GradientStats`` with
forgetting (``docs/method.md``, Stage 0): before merging a step's statistics,
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
            if old is not None and (old.mean.dtype, old.mean.device) != (st.mean.dtype, st.mean.device):
                # The parameter changed dtype or device (model.double(), .to(...)): the
                # carried statistics follow it.
                old = GradientStats(*(torch.as_tensor(t).to(st.mean.device, st.mean.dtype)
                                      for t in (old.count, old.mean, old.m2)))
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
        """Check every saved entry (names, shapes, counts >= 0, finite moments, M2 >= 0),
        then replace the state; a failed load leaves the state as it was."""
        steps = d.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"state_dict['state']['steps']: must be an int >= 0, got {steps!r}")
        saved = d.get("stats", {})
        if not isinstance(saved, Mapping):
            raise ConfigError("state_dict['state']['stats']: expected a mapping source -> parameter -> moments")
        stats: dict[Key, GradientStats] = {}
        for src, per in saved.items():
            if not isinstance(per, Mapping):
                raise ConfigError(f"state_dict: statistics of source {src!r} are not a mapping; pass the saved dict")
            for name, t in per.items():
                where = f"state_dict: statistics of parameter {name!r} (source {src!r})"
                if name not in shapes:
                    raise ConfigError(
                        f"state_dict: statistics for unknown parameter {name!r} (source {src!r}); "
                        f"build the calibrator with the same parameters and names as when saving"
                    )
                if not (isinstance(t, Mapping) and all(isinstance(t.get(k), torch.Tensor)
                                                       for k in ("count", "mean", "m2"))):
                    raise ConfigError(f"{where}: expected tensors 'count', 'mean' and 'm2'; pass the saved dict")
                count, mean, m2 = t["count"], t["mean"], t["m2"]
                if tuple(mean.shape) != tuple(shapes[name]):
                    raise ConfigError(
                        f"state_dict: parameter {name!r} has shape {tuple(shapes[name])} but the "
                        f"saved statistics have {tuple(mean.shape)}; load into the same model"
                    )
                if tuple(m2.shape) != tuple(mean.shape) or count.numel() != 1 and tuple(count.shape) != tuple(mean.shape):
                    raise ConfigError(f"{where}: 'count', 'mean' and 'm2' have mismatched shapes; the checkpoint is corrupt")
                if not (mean.is_floating_point() and m2.is_floating_point() and count.is_floating_point()):
                    raise ConfigError(f"{where}: the moments must be floating tensors; the checkpoint is corrupt")
                # One host sync per entry: finite, count >= 0, M2 >= 0.
                ok = torch.stack([
                    torch.isfinite(count).all() & (count >= 0).all(),
                    torch.isfinite(mean).all(),
                    torch.isfinite(m2).all() & (m2 >= 0).all(),
                ]).tolist()
                for flag, what in zip(ok, ("'count' must be finite and >= 0",
                                           "'mean' must be finite",
                                           "'m2' must be finite and >= 0")):
                    if not flag:
                        raise ConfigError(f"{where}: {what}; the checkpoint is corrupt, save it again")
                stats[(src, name)] = GradientStats(count.clone(), mean.clone(), m2.clone())
        self.stats = stats
        self.steps = steps
