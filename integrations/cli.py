"""The ``bogc`` command: ``bogc bench`` and ``bogc validate``.

Each subcommand lives in its own module and is imported only when run, so
``bogc validate`` works on a bare NumPy install.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bogc",
        description="Bayesian-Oriented Gradient Calibration: benchmarks and install checks.",
    )
    parser.add_argument("command", choices=["bench", "validate"], help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "bench":
        from .bench import main as bench_main

        return int(bench_main(rest) or 0)
    from bogc_core.validate import main as validate_main

    return int(validate_main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
