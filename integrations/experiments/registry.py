"""Method names accepted by ``bogc bench --methods`` and how each is built.

``MAIN_METHODS`` run in every setting; ``ABLATIONS`` (BOGC variants) in
``standard`` when asked for (``--methods ablations`` or by name).
"""

from __future__ import annotations

from collections.abc import Callable

from bogc_core import CalibrationConfig
from bogc_core.errors import ConfigError

from .base import Method
from .bogc_method import BOGC, INVERSE_VARIANCE
from .mgda import MGDA
from .mmpareto import MMPareto
from .ogm_ge import OGMGE
from .pcgrad import PCGrad
from .summed import Sum, Uniform


def _bogc(name: str, samples: str = "microbatch", rho: float | None = None, **cfg) -> Callable[[], Method]:
    return lambda: BOGC(name, CalibrationConfig(**cfg), samples=samples, rho=rho)


METHODS: dict[str, Callable[[], Method]] = {
    "sum": Sum,
    "uniform": Uniform,
    "inverse_variance": lambda: BOGC("inverse_variance", INVERSE_VARIANCE),
    "bogc": _bogc("bogc"),
    "bogc_tuned": lambda: BOGC("bogc_tuned", CalibrationConfig(), grid={"gamma": [0.25, 0.5, 1.0]}),
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "mmpareto": MMPareto,
    "ogm_ge": OGMGE,
    # ablations of BOGC's stages (each changes one option of the default)
    "bogc_precision": _bogc("bogc_precision", evidence_from="precision"),
    "bogc_w_uniform": _bogc("bogc_w_uniform", weights="uniform"),
    "bogc_w_dempster": _bogc("bogc_w_dempster", weights="dempster"),
    "bogc_scale_none": _bogc("bogc_scale_none", scale="none"),
    "bogc_gamma0.25": _bogc("bogc_gamma0.25", gamma=0.25),
    "bogc_gamma1": _bogc("bogc_gamma1", gamma=1.0),
    "bogc_gamma2": _bogc("bogc_gamma2", gamma=2.0),
    "bogc_scope_global": _bogc("bogc_scope_global", scope="global"),
    "bogc_per_example": _bogc("bogc_per_example", samples="per_example"),
    "bogc_laplace": _bogc("bogc_laplace", samples="laplace"),
    "bogc_steps": _bogc("bogc_steps", samples="steps", rho=0.9),
}

MAIN_METHODS = ["sum", "uniform", "inverse_variance", "bogc", "bogc_tuned", "pcgrad", "mgda",
                "mmpareto", "ogm_ge"]
ABLATIONS = [k for k in METHODS if k.startswith("bogc_") and k != "bogc_tuned"]
QUICK_METHODS = ["sum", "bogc", "pcgrad"]


def build(name: str) -> Method:
    """A fresh method object by name (see :data:`METHODS`)."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ConfigError(f"methods: unknown method {name!r}; choose from {sorted(METHODS)}, "
                          f"'main' or 'ablations'") from None


def expand(spec: str | None) -> list[str]:
    """Parse ``--methods``: comma list of names, ``main``, ``ablations``, ``all``."""
    if not spec:
        return list(MAIN_METHODS)
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        group = {"main": MAIN_METHODS, "ablations": ABLATIONS, "all": list(METHODS)}.get(tok, [tok])
        for g in group:
            if g not in METHODS:
                build(g)
            if g not in out:
                out.append(g)
    return out


#: validation grids searched by ``bogc bench --tune`` (standard setting, validation split)
LR_GRID = [0.01, 0.03, 0.1]
GRIDS: dict[str, dict[str, list]] = {m: {"lr": LR_GRID} for m in MAIN_METHODS}
GRIDS["bogc_tuned"] = {"gamma": [0.25, 0.5, 1.0], "lr": LR_GRID}
GRIDS["ogm_ge"] = {"alpha": [0.1, 0.5], "lr": LR_GRID}

#: hyper-parameters used without ``--tune``: the values ``--tune`` chose on the
#: validation split (see docs/benchmarks.md); ablations use ``bogc``'s learning rate.
DEFAULTS: dict[str, dict[str, dict]] = {
    "av-digits": {
        "sum": {"lr": 0.03},
        "uniform": {"lr": 0.1},
        "inverse_variance": {"lr": 0.03},
        "bogc": {"lr": 0.03},
        "bogc_tuned": {"gamma": 0.5, "lr": 0.03},
        "pcgrad": {"lr": 0.03},
        "mgda": {"lr": 0.03},
        "mmpareto": {"lr": 0.03},
        "ogm_ge": {"alpha": 0.1, "lr": 0.03},
    },
    "mfeat": {
        "sum": {"lr": 0.1},
        "uniform": {"lr": 0.1},
        "inverse_variance": {"lr": 0.1},
        "bogc": {"lr": 0.03},
        "bogc_tuned": {"gamma": 0.25, "lr": 0.03},
        "pcgrad": {"lr": 0.1},
        "mgda": {"lr": 0.1},
        "mmpareto": {"lr": 0.1},
        "ogm_ge": {"alpha": 0.1, "lr": 0.1},
    },
}
FALLBACK_LR = 0.03  # the value most methods chose on both shipped data sets


def configured(name: str, dataset: str, chosen: dict[str, dict] | None = None) -> Method:
    """Method ``name`` with the hyper-parameters chosen for ``dataset``.

    ``chosen`` (from a ``--tune`` run) takes precedence over :data:`DEFAULTS`.
    Ablations take the learning rate chosen for ``bogc``.
    """
    table = dict(DEFAULTS.get(dataset, {}))
    table.update(chosen or {})
    params = dict(table.get(name, {}))
    if name in ABLATIONS and "lr" not in params:
        params["lr"] = table.get("bogc", {}).get("lr", FALLBACK_LR)
    params.setdefault("lr", FALLBACK_LR)
    m = build(name)
    return m.with_params(**params)
