"""Method names accepted by ``bogc bench --methods``, how each is built, and the tuning grid.

- ``MAIN_METHODS`` run in every setting and every docs table.
- ``ABLATIONS``: BOGC with one stage changed, and the earlier (unfaithful)
  variants of three baselines (PCGrad and MGDA per encoder, OGM-GE with the
  unimodal gradients or dominant-only noise), kept only as labelled ablations.
- ``SEARCH``: the pre-registered variants of BOGC's free choices, compared
  with ``bogc`` on the validation split only (``bogc bench --search``).

Every method's learning rate is tuned the same way (:func:`.protocol.tune_lr`):
the base grid :data:`LR_GRID` (0.003 to 1.0, half-decade steps), :data:`LR_EXTENSIONS`
points beyond its edges, successive halving over the tuning seeds. A method's own
hyper-parameters stay at their defaults (BOGC's gamma, OGM-GE's alpha, MMPareto's
gamma); BOGC's are explored in the pre-registered search instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError

from .base import Method
from .bogc import BOGC, INVERSE_VARIANCE
from .fusion_only import FusionOnly
from .mgda import MGDA, MGDAPerEncoder
from .mmpareto import MMPareto
from .ogm_ge import OGMGE, OGMGEDominantNoise, OGMGEUnimodal
from .pcgrad import PCGrad, PCGradPerEncoder
from .summed import Sum, Uniform


def _bogc(name: str, samples: str = "microbatch", rho: float | None = None,
          norm_match: bool = False, gamma_schedule: tuple[float, float] | None = None,
          **cfg: Any) -> Callable[[], Method]:
    return lambda: BOGC(name, CalibrationConfig(**cfg), samples=samples, rho=rho,
                        norm_match=norm_match, gamma_schedule=gamma_schedule)


METHODS: dict[str, Callable[[], Method]] = {
    "sum": Sum,
    "fusion_only": FusionOnly,
    "bogc": _bogc("bogc"),
    "bogc_normmatched": _bogc("bogc_normmatched", norm_match=True),
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "mmpareto": MMPareto,
    "ogm_ge": OGMGE,
    "uniform": Uniform,
    "inverse_variance": lambda: BOGC("inverse_variance", INVERSE_VARIANCE),
    # ablations: BOGC with one option changed, and the earlier baseline variants
    "bogc_w_uniform": _bogc("bogc_w_uniform", weights="uniform"),
    "bogc_w_dempster": _bogc("bogc_w_dempster", weights="dempster"),
    "bogc_scale_none": _bogc("bogc_scale_none", scale="none"),
    "bogc_per_example": _bogc("bogc_per_example", samples="per_example"),
    "bogc_laplace": _bogc("bogc_laplace", samples="laplace"),
    "bogc_steps": _bogc("bogc_steps", samples="steps", rho=0.9),
    "pcgrad_per_encoder": PCGradPerEncoder,
    "mgda_per_encoder": MGDAPerEncoder,
    "ogm_ge_unimodal": OGMGEUnimodal,
    "ogm_ge_dominant_noise": OGMGEDominantNoise,
    "bogc_scope_global": _bogc("bogc_scope_global", scope="global"),
    "bogc_rho0.5": _bogc("bogc_rho0.5", rho=0.5),
    # the pre-registered search over BOGC's free choices (validation only)
    "bogc_ev_precision": _bogc("bogc_ev_precision", evidence_from="precision"),
    "bogc_gamma_anneal": _bogc("bogc_gamma_anneal", gamma_schedule=(1.0, 0.25)),
    "bogc_smax2": _bogc("bogc_smax2", s_max=2.0),
}

MAIN_METHODS = ["sum", "fusion_only", "bogc", "bogc_normmatched", "pcgrad", "mgda", "mmpareto",
                "ogm_ge"]
ABLATIONS = ["bogc_w_uniform", "bogc_w_dempster", "bogc_scale_none", "bogc_per_example",
             "bogc_laplace", "bogc_steps", "bogc_scope_global", "bogc_rho0.5",
             "pcgrad_per_encoder", "mgda_per_encoder", "ogm_ge_unimodal", "ogm_ge_dominant_noise",
             "uniform", "inverse_variance"]
SEARCH = ["bogc", "bogc_ev_precision", "bogc_gamma_anneal", "bogc_smax2"]
QUICK_METHODS = ["sum", "bogc", "pcgrad"]

#: the group names ``--methods`` accepts besides method names
GROUPS = ("main", "ablations", "search", "all")


def lr_at(k: int) -> float:
    """Rung ``k`` of the learning-rate ladder: 1 and 3 times the powers of ten, alternating
    (``lr_at(0) = 1.0``, ``lr_at(-1) = 0.3``, ``lr_at(-2) = 0.1``, ``lr_at(1) = 3.0``): steps of
    about half a decade (x3, then x3.33)."""
    return float(f"{(1, 3)[k % 2]}e{k // 2}")


#: the ladder indices of the base grid of every method, 0.003 to 1.0 (333x, 6 points)
LR_BASE = (-5, 0)
#: the base grid, in increasing order: ties (equal mean validation accuracy) go to the smaller
LR_GRID = [lr_at(k) for k in range(LR_BASE[0], LR_BASE[1] + 1)]
GRID: dict[str, list[Any]] = {"lr": LR_GRID}
#: grid points added to every method's search, one ladder step beyond an edge each: where a
#: best point sits at an edge, beyond that edge; else beyond the edge nearer the best point.
#: Every method trains the same number of configurations (:func:`.protocol.tuning_budget`).
LR_EXTENSIONS = 2
#: learning rate without tuning (``--no-tune``)
FALLBACK_LR = 0.03


def build(name: str) -> Method:
    """A fresh method object by name (see :data:`METHODS`)."""
    try:
        return METHODS[name]()
    except KeyError:
        close = difflib.get_close_matches(name, [*METHODS, *GROUPS], n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"--methods: unknown method {name!r}; {hint}choose from "
                          f"{sorted(METHODS)}, 'main', 'ablations', 'search' or 'all'") from None


def expand(spec: str | None) -> list[str]:
    """Parse ``--methods``: comma list of names, ``main``, ``ablations``, ``search``, ``all``."""
    if not spec:
        return list(MAIN_METHODS)
    groups = {"main": MAIN_METHODS, "ablations": ABLATIONS, "search": SEARCH, "all": list(METHODS)}
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        for g in groups.get(tok, [tok]):
            if g not in METHODS:
                build(g)
            if g not in out:
                out.append(g)
    return out


def configured(name: str, chosen: dict[str, dict] | None = None) -> Method:
    """Method ``name`` with the hyper-parameters chosen on validation (``chosen[name]``),
    else the fallback learning rate."""
    params = dict((chosen or {}).get(name, {}))
    params.setdefault("lr", FALLBACK_LR)
    return build(name).with_params(**params)
