"""FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters in the calibrator.

Under FSDP2 a module's registered parameters are sharded ``DTensor``\\ s, but
forward and backward compute with *unsharded* parameters that FSDP2
all-gathers before each use: the autograd graph reaches the unsharded
tensors, never the sharded ones, so ``torch.autograd.grad`` w.r.t. a sharded
parameter fails ("appears to not have been used in the graph").

The calibrator therefore takes its gradient samples w.r.t. the unsharded
tensor of each sharded parameter (:func:`compute_params`; FSDP2's own
pre-backward hooks re-gather them when they were freed after forward). Each
rank thus holds statistics of its own examples for the whole tensor; they are
summed over the ranks with the same single all-reduce as under plain data
parallelism, every rank calibrates the whole tensor (so the group reductions
of ``scope="tensor"`` and ``"global"`` see exactly the single-process
statistics), and :func:`local_grad` keeps the rank's own shard of the
result, as a ``DTensor`` with the parameter's mesh and placements.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from bogc_core.errors import ConfigError

__all__ = ["is_sharded", "compute_params", "compute_tensors", "local_grad", "layer_type"]


def _loaded(module: str, name: str) -> Any:
    """``module.name`` if the caller's program imported ``module``, else ``None``.

    An instance of a class exists only once its module was imported, so the
    checks below never import one themselves: importing
    ``torch.distributed.fsdp`` stores the default process group in function
    defaults, which keeps it (and gloo's worker threads) alive past
    ``destroy_process_group`` until the interpreter shuts down.
    """
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (an FSDP2 or tensor-parallel parameter)."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(p, dtensor)


def layer_type(mod: object) -> type:
    """``type(mod)``, seen through the class FSDP2 gives each ``fully_shard`` module.

    ``fully_shard`` turns an ``nn.Linear`` into an instance of a new class
    ``FSDPLinear(FSDPModule, nn.Linear)`` that does not override ``forward``;
    the per-layer shortcut treats it as the ``nn.Linear`` it computes as.
    """
    t = type(mod)
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is not None and isinstance(mod, fsdp_module):
        bases = [b for b in t.__bases__ if b is not fsdp_module]
        if len(bases) == 1 and getattr(t, "forward", None) is getattr(bases[0], "forward", None):
            return bases[0]
    return t


def _fsdp_params() -> dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` over every ``fully_shard`` module alive."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - torch without the composable API
        return {}
    out: dict[int, Any] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref  # weak references to the states
        group = getattr(state, "_fsdp_param_group", None)
        for fp in getattr(group, "fsdp_params", None) or ():
            out[id(fp.sharded_param)] = fp
    return out


def compute_params(
    params: list[tuple[str, torch.Tensor]], index: dict[int, int]
) -> tuple[dict[int, int], list[torch.Tensor]]:
    """The tensors the graph reaches, and an index that maps them to parameter positions.

    Plain parameters map to themselves. A sharded FSDP2 parameter maps to its
    unsharded tensor (set up by the forward pass). Returns ``(index, tensors)``
    where ``index`` extends ``index`` (``id -> position``) with the unsharded
    tensors and ``tensors[i]`` is what autograd must differentiate for
    parameter ``i``.
    """
    if not any(is_sharded(p) for _, p in params):
        return index, [p for _, p in params]
    fsdp = _fsdp_params()
    full = dict(index)
    tensors: list[torch.Tensor] = []
    for i, (name, p) in enumerate(params):
        if not is_sharded(p):
            tensors.append(p)
            continue
        u = _unsharded(f"params ({name!r})", p, fsdp)
        full[id(u)] = i
        tensors.append(u)
    return full, tensors


def compute_tensors(tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Each tensor as the graph reaches it: a sharded FSDP2 parameter's unsharded tensor,
    any other tensor itself (``what`` names the tensors in errors)."""
    if not any(is_sharded(t) for t in tensors):
        return tensors
    fsdp = _fsdp_params()
    return [_unsharded(what, t, fsdp) if is_sharded(t) else t for t in tensors]


def _unsharded(what: str, p: torch.Tensor, fsdp: dict[int, Any]) -> torch.Tensor:
    fp = fsdp.get(id(p))
    if fp is None:
        raise ConfigError(
            f"{what}: a DTensor parameter that no fully_shard module owns; the "
            f"calibrator supports FSDP2 (torch.distributed.fsdp.fully_shard) sharding only. "
            f"Pass the parameters of a fully_shard model, after fully_shard was applied"
        )
    u = getattr(fp, "_unsharded_param", None)
    if u is None:
        raise ConfigError(
            f"{what}: its FSDP2 module has not run forward yet; call backward "
            f"with losses computed by the sharded model's forward"
        )
    assert isinstance(u, torch.Tensor)
    return u


def local_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` (the whole tensor, every rank equal) as ``p``'s gradient: its local shard for a
    ``DTensor`` ``p`` (same mesh and placements, no communication), ``g`` itself otherwise."""
    if not is_sharded(p):
        return g
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    local = g.detach().to(dtype=p.dtype, device=p.to_local().device)  # type: ignore[attr-defined]
    return distribute_tensor(local, mesh, placements, src_data_rank=None)
