"""JAX integration: calibrate per-source gradient pytrees, inside or outside ``jax.jit``.

The core runs unchanged on ``jax.numpy`` arrays (``bogc_core.calibrate`` on
JAX arrays works eagerly). Its input checks and its zero-variance detection
branch on array *values*, which a traced array inside ``jax.jit`` cannot do,
so :func:`calibrate_pytrees` assembles the same pipeline (``docs/method.md`` Stages
0-5) from the core's value-independent pieces, ``GradientStats``,
``posterior`` and ``calibrate.calibrated_update`` (Stages 2-5). The two value-dependent
steps are done without Python branches:

- the empirical-Bayes ``beta0 = alpha0 * mean_d(M2/n)`` is added to the
  posterior's ``beta`` after a ``beta0 = 0`` update (``beta_n`` is linear in
  ``beta0``), instead of the core's check that some dimension has ``n >= 2``;
  that check is done here on the static sample counts;
- a group with a zero-variance source gets equal evidence through
  ``jnp.where`` rather than an ``if``.

Checks that need values (finite inputs) run only on concrete arrays, that is
outside ``jit``; inside ``jit`` a NaN gradient gives a NaN update. The core's
range checks of the options (``gamma``, ``clip``, ``prior_weight`` and the
fixed source weights against the leaves' dtype) need no values and run in
both cases.

Example::

    import jax, jax.numpy as jnp
    from bogc_core.integrations.jax import calibrate_pytrees

    grads = {"audio": {"w": jnp.ones((8, 3))}, "video": {"w": jnp.ones((8, 3))}}
    update = jax.jit(calibrate_pytrees)(grads)   # {"w": array of shape (3,)}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from bogc_core import CalibrationConfig, GradientStats, Posterior, posterior
from bogc_core._calibration import calibrated_update
from bogc_core._inputs import _work_space, check_ranges, resolve_source_weights
from bogc_core._namespace import Space
from bogc_core.errors import (
    ConfigError,
    DTypeError,
    InsufficientSamplesError,
    NonFiniteError,
    ShapeError,
)

__all__ = ["calibrate_pytrees", "per_source_stats"]

PyTree = Any


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _normalise_sources(
    grads: Mapping[str, PyTree] | Sequence[PyTree],
) -> tuple[list[str], list[PyTree]]:
    if isinstance(grads, Mapping):
        names = [str(k) for k in grads]
        trees = list(grads.values())
    elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        trees = list(grads)
        names = [str(i) for i in range(len(trees))]
    else:
        raise ShapeError(
            f"grads: expected a mapping name -> gradient pytree or a sequence of pytrees, one "
            f"per source, got {type(grads).__name__}"
        )
    if not trees:
        raise ShapeError("grads: empty; pass one gradient pytree per source")
    return names, trees


def per_source_stats(
    grads: Mapping[str, PyTree] | Sequence[PyTree],
) -> tuple[list[str], list[list[GradientStats]], Any]:
    """Statistics of every leaf of every source.

    ``stats[k][i].count`` equals ``n``, the length of the leaf's leading axis.

    ``grads``: one pytree per source (a mapping name -> pytree or a
    sequence), all of one tree structure; each leaf has shape
    ``(n, *param_shape)`` with the ``n`` gradient samples on the leading axis.
    Returns ``(names, stats, treedef)`` where ``stats[k][i]`` is the
    :class:`~bogc_core.GradientStats` of leaf ``i`` of source ``k``
    (``m = mean``, ``M2 = sum (g - m)^2`` over the sample axis). Works on
    traced arrays; finiteness is checked only on concrete ones.
    """
    names, stats, _, treedef = _leaf_stats(grads)
    return names, stats, treedef


def _leaf_stats(
    grads: Mapping[str, PyTree] | Sequence[PyTree],
) -> tuple[list[str], list[list[GradientStats]], list[list[int]], Any]:
    """:func:`per_source_stats` plus the static sample counts ``counts[k][i]``."""
    names, trees = _normalise_sources(grads)
    leaves0, treedef = jax.tree_util.tree_flatten(trees[0])
    if not leaves0:
        raise ShapeError(f"grads[{names[0]!r}]: the pytree has no array leaves")
    out: list[list[GradientStats]] = []
    counts: list[list[int]] = []
    for name, tree in zip(names, trees, strict=True):
        leaves, td = jax.tree_util.tree_flatten(tree)
        if cast(Any, td) != treedef:  # (PyTreeDef has no comparison in the type stubs)
            raise ShapeError(
                f"grads[{name!r}]: tree structure {td} differs from grads[{names[0]!r}]'s "
                f"{treedef}; every source must give a gradient for the same parameters (use "
                f"zeros for a parameter a source does not reach)"
            )
        row, row_n = [], []
        for i, (leaf, ref) in enumerate(zip(leaves, leaves0, strict=True)):
            where = f"grads[{name!r}] leaf {i}"
            if not hasattr(leaf, "shape") or len(leaf.shape) < 1:
                raise ShapeError(
                    f"{where}: expected an array with a leading sample axis (n, *param_shape), "
                    f"got {type(leaf).__name__} of shape {getattr(leaf, 'shape', None)}"
                )
            if tuple(leaf.shape[1:]) != tuple(ref.shape[1:]):
                raise ShapeError(
                    f"{where}: parameter shape {tuple(leaf.shape[1:])} differs from "
                    f"{tuple(ref.shape[1:])} in grads[{names[0]!r}]; sources must describe the "
                    f"same parameters"
                )
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise DTypeError(
                    f"{where}: dtype {leaf.dtype} is not real floating; cast gradients to float32 "
                    f"or float64"
                )
            if leaf.shape[0] < 1:
                raise InsufficientSamplesError(
                    f"{where}: no gradient samples on the leading axis; pass at least one"
                )
            if _is_concrete(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
                raise NonFiniteError(
                    f"{where}: contains NaN or infinite values; check the loss for overflow or "
                    f"drop the offending batch"
                )
            m = jnp.mean(leaf, axis=0)
            d = leaf - m
            row.append(GradientStats(float(leaf.shape[0]), m, jnp.sum(d * d, axis=0)))
            row_n.append(int(leaf.shape[0]))
        out.append(row)
        counts.append(row_n)
    return names, out, counts, treedef


def _calibrate_group(
    stats: Sequence[GradientStats],
    counts: Sequence[Any],
    lam: Sequence[float],
    config: CalibrationConfig,
) -> dict[str, Any]:
    """``docs/method.md`` Stages 1-5 for one group, free of value-dependent Python branches.

    ``stats[k]`` has the group's shape ``(*shape)``; ``counts[k]`` is the
    sample count (a float or an array of that shape). Returns ``gradient``
    ``(*shape)``, ``weights``/``evidence`` ``(S, *shape)``, ``uncertainty``
    and ``belief_scale`` ``(*shape)``.
    """
    prior = config.prior
    posts: list[Posterior] = []
    zero = jnp.asarray(False)
    for st, n in zip(stats, counts, strict=True):
        if prior.beta0 is None:
            # beta_n is linear in beta0: update with beta0 = 0, then add the
            # empirical-Bayes alpha0 * mean_d(M2/n) (every n >= 2, checked by the caller).
            p = posterior(st, dataclasses.replace(prior, beta0=0.0))
            beta0 = prior.alpha0 * jnp.mean(st.m2 / n)
            p = Posterior(p.mu, p.kappa, p.alpha, p.beta + beta0)
            zero = zero | jnp.all(st.m2 == 0)
        else:
            p = posterior(st, prior)
        posts.append(p)
    # A source with zero pooled variance: equal evidence for the whole group, as
    # the core does, chosen by jnp.where (inside the core) rather than an `if`.
    g, w, fused_u, s, e = calibrated_update(posts, lam, config, zero)
    return {"gradient": g, "weights": w, "uncertainty": fused_u, "belief_scale": s, "evidence": e}


def calibrate_pytrees(
    grads: Mapping[str, PyTree] | Sequence[PyTree],
    config: CalibrationConfig | None = None,
    source_weights: Sequence[float] | Mapping[str, float] | None = None,
    return_info: bool = False,
) -> PyTree | tuple[PyTree, PyTree]:
    """Calibrated update of every parameter from each source's gradient samples.

    Parameters
    ----------
    grads : mapping name -> pytree, or sequence of pytrees
        One pytree per source (each source's loss), all with one tree
        structure; every leaf has shape ``(n, *param_shape)``, ``n`` gradient
        samples (per-example or micro-batch gradients, for instance from
        ``jax.vmap(jax.grad(loss))``) on the leading axis.
    config : CalibrationConfig, optional
        Options of ``docs/method.md``. ``scope="tensor"`` (default) calibrates each
        leaf on its own; ``scope="global"`` pools all leaves into one group.
        ``backend`` must be ``"auto"`` or ``"reference"`` (this is the
        reference math in ``jax.numpy``).
    source_weights : sequence or mapping of float, optional
        Fixed ``lambda_k`` (static Python floats), applied after calibration.
    return_info : bool
        Also return, per leaf, a dict with ``weights`` and ``evidence``
        ``(S, *param_shape)``, ``uncertainty`` and ``belief_scale``
        ``(*param_shape)``.

    Returns
    -------
    pytree
        Same structure as one source's pytree; each leaf is
        ``g_hat = s * S * sum_k w_k * lambda_k * mu_k`` of shape
        ``param_shape``. With ``return_info``, ``(update, info)``.

    Usable inside ``jax.jit`` (``config`` and ``source_weights`` are static
    Python values; close over them or mark them static). Matches
    :func:`bogc_core.calibrate` / :func:`bogc_core.calibrate_tensors` on the
    same statistics.
    """
    config = CalibrationConfig() if config is None else config
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected CalibrationConfig, got {type(config).__name__}")
    if config.fast_path not in ("auto", "reference"):
        raise ConfigError(
            f"fast_path: {config.fast_path!r} is not available for JAX pytrees; use 'auto' or "
            f"'reference'"
        )
    names, stats, counts, treedef = _leaf_stats(grads)
    lam = resolve_source_weights(names, source_weights)
    # The core's range checks (gamma, clip, prior_weight, source weights against the
    # dtype), from the static dtype: they need no values, so they hold under jit too.
    for dtype in sorted({str(st.mean.dtype) for row in stats for st in row}):
        check_ranges(_work_space(Space(jnp, jnp.dtype(dtype), None)), len(names), lam, config)
    if config.prior.beta0 is None:
        for name, row_n in zip(names, counts, strict=True):
            for i, n in enumerate(row_n):
                if n < 2:
                    raise InsufficientSamplesError(
                        f"grads[{name!r}] leaf {i}: {n} gradient sample on the leading axis, so "
                        f"the variance is unidentifiable; pass per-example or micro-batch "
                        f"gradients (n >= 2) or give NormalGammaPrior(beta0=...) explicitly"
                    )
    if config.scope == "tensor":
        results = [
            _calibrate_group(
                [row[i] for row in stats], [float(row_n[i]) for row_n in counts], lam, config
            )
            for i in range(len(stats[0]))
        ]
    else:
        results = _calibrate_global(stats, counts, lam, config)
    update = jax.tree_util.tree_unflatten(treedef, [r["gradient"] for r in results])
    if not return_info:
        return update
    info = jax.tree_util.tree_unflatten(
        treedef, [{k: v for k, v in r.items() if k != "gradient"} for r in results]
    )
    return update, info


def _calibrate_global(
    stats: Sequence[Sequence[GradientStats]],
    counts: Sequence[Sequence[int]],
    lam: Sequence[float],
    config: CalibrationConfig,
) -> list[dict[str, Any]]:
    """One group over all leaves (flattened and concatenated), split back per leaf."""
    shapes = [tuple(st.mean.shape) for st in stats[0]]
    sizes = [math.prod(sh) for sh in shapes]
    pooled, pooled_n = [], []
    for row, row_n in zip(stats, counts, strict=True):
        dtype = row[0].mean.dtype
        n = jnp.concatenate(
            [jnp.full((size,), float(k), dtype=dtype) for k, size in zip(row_n, sizes, strict=True)]
        )
        mean = jnp.concatenate([jnp.reshape(st.mean, (-1,)) for st in row])
        m2 = jnp.concatenate([jnp.reshape(st.m2, (-1,)) for st in row])
        pooled.append(GradientStats(n, mean, m2))
        pooled_n.append(n)
    res = _calibrate_group(pooled, pooled_n, lam, config)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        sl = slice(start, start + size)
        S = len(stats)
        out.append(
            {
                "gradient": jnp.reshape(res["gradient"][sl], shape),
                "weights": jnp.reshape(res["weights"][:, sl], (S,) + shape),
                "evidence": jnp.reshape(res["evidence"][:, sl], (S,) + shape),
                "uncertainty": jnp.reshape(res["uncertainty"][sl], shape),
                "belief_scale": jnp.reshape(res["belief_scale"][sl], shape),
            }
        )
        start += size
    return out
