"""``bogc validate``: every closed form of docs/method.md on every available array namespace.

Run ``bogc validate`` or ``python -m bogc_core.validate``. Each identity of
docs/method.md#identities (1-10) plus an end-to-end comparison of the whole
pipeline ("E") is evaluated on every array library that runs here (NumPy,
array-api-strict, PyTorch CPU and CUDA, JAX, CuPy with a CUDA device), against
the float64 oracle of :mod:`bogc_core.testing`. The output is a table of the
largest normalised error ``max|got - want| / max(max|want|, 1)`` per identity
and namespace next to the dtype's tolerance; the exit status is 1 if any check
fails or raises. The checks themselves live in :mod:`bogc_core.testing`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import bogc_core as bc
from bogc_core.testing import (
    IDENTITIES,
    Backend,
    Namespace,
    Result,
    available_namespaces,
    format_table,
    run,
)

__all__ = ["IDENTITIES", "Namespace", "Result", "available_namespaces", "run", "main"]

KNOWN_NAMESPACES = tuple(b.value for b in Backend)
# Names accepted on the command line for backwards compatibility.
_ALIASES = {"jax.numpy": "jax"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bogc validate``; returns 0 if every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="bogc validate",
        description="Check every closed form of docs/method.md on each available array namespace.",
    )
    parser.add_argument(
        "--namespaces",
        help="comma-separated subset, e.g. numpy,torch (default: every one that imports)",
    )
    parser.add_argument("--dtype", choices=["float64", "float32", "both"], default="float64")
    parser.add_argument("--identities", help="comma-separated keys, e.g. 1,4,E (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    wanted = None if not args.namespaces else [s.strip() for s in args.namespaces.split(",")]
    if wanted:
        wanted = [_ALIASES.get(w, w) for w in wanted]
    identities = None if not args.identities else [s.strip() for s in args.identities.split(",")]
    if identities:
        unknown = sorted(set(identities) - {i.key for i in IDENTITIES})
        if unknown:
            parser.error(
                f"--identities: unknown keys {unknown}; choose from {[i.key for i in IDENTITIES]}"
            )
    spaces: list[Namespace] = []
    missing: dict[str, str] = {}
    for dt in dtypes:
        found, miss = available_namespaces(dt, wanted)
        spaces.extend(found)
        missing.update(miss)
    if wanted:
        unknown = [w for w in wanted if w not in KNOWN_NAMESPACES]
        if unknown:
            parser.error(f"--namespaces: unknown {unknown}; choose from {list(KNOWN_NAMESPACES)}")
        spaces = [s for s in spaces if s.name in wanted]
        if not spaces:
            print(f"none of {wanted} is available: {missing}", file=sys.stderr)
            return 1

    print(
        f"bogc {bc.__version__}: closed forms of docs/method.md on "
        f"{', '.join(dict.fromkeys(s.name for s in spaces))}"
    )
    results: list[Result] = []
    for dt in dtypes:
        results.extend(run([s for s in spaces if s.dtype_name == dt], identities, dt, args.seed))
    print(format_table(results))
    for name, why in missing.items():
        print(f"not checked: {name} ({why})")
    bad = [r for r in results if not r.passed]
    for r in bad:
        print(
            f"{r.status}: identity {r.identity} on {r.namespace} ({r.dtype}): "
            f"error {r.error:.3g} > {r.tolerance:g}; " + "; ".join(r.notes)
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=1, default=str)
    print("all checks passed" if not bad else f"{len(bad)} check(s) failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
