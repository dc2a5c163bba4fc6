"""The ``bogc`` command: ``bogc bench``, ``bogc validate`` and ``bogc data``.

Each subcommand lives in its own module and is imported only when run, so
``bogc validate`` and ``bogc data check`` work on a bare NumPy install.

Errors are sorted at the top, in :func:`main`:

- a user error prints one line, ``bogc: error: <argument>: <what> <fix>``, and
  exits 2. User errors are every :class:`bogc_core.BOGCError` (bad input,
  named by the library), a missing optional package (with the
  ``pip install "bogc[...]"`` that brings it), an operating-system error on a
  file or folder the user named (``OSError``: missing, unreadable, disk full),
  and running out of memory;
- anything else is a bug in bogc, not in the input: the traceback is printed
  with a line asking for a report, and the exit status is 1;
- ``--debug`` (anywhere on the line, or ``BOGC_DEBUG=1``) prints the
  traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["main", "COMMANDS", "EXIT_USAGE", "EXIT_BUG"]

#: exit status of a user error (argparse's convention)
EXIT_USAGE = 2
#: exit status of a bug (an exception that is not a user error)
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

#: subcommand -> one-line description, shown by ``bogc --help``
COMMANDS = {
    "bench": "train the same multi-modal model with BOGC and each baseline, print a table and "
    "write results.json and plots (needs the torch and bench extras)",
    "validate": "check every closed form of the method on each installed array library "
    "(an install check; exits 1 on any failure)",
    "data": "user data sets: 'bogc data check FILE.npz' checks a file against the format, "
    "'bogc data convert' turns the public Scene-15 / PIE .mat files into that format",
}

# Optional third-party packages -> the extras that install them. A missing one
# is a user error with an install hint; any other missing module is a bug.
_EXTRA_OF = {
    "torch": "torch",
    "tqdm": "bench",
    "matplotlib": "bench",
    "jax": "jax",
    "jaxlib": "jax",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "transformers": "transformers",
    "cupy": "cupy",
}
# What each subcommand needs, so that the hint installs everything at once.
_EXTRAS_OF_COMMAND = {"bench": ("torch", "bench")}

_CONVERT_MODULE = "bogc_core.integrations.data.convert"
#: classes listed one by one by ``bogc data check``; the rest are summarised
_SHOWN_CLASSES = 50


class UsageError(Exception):
    """A bad command line at the top level or in ``bogc data``: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``UsageError``), not usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


# --------------------------------------------------------------------- parsers
def _top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    p = _Parser(
        prog="bogc",
        usage="bogc [--debug] [--version] {bench,validate,data} ...",
        description="Bayesian-Oriented Gradient Calibration: benchmarks, install checks and "
        "data sets. 'bogc COMMAND --help' describes each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{commands}\n\nexamples:\n"
        "  bogc bench --quick            smoke run of the benchmark, under a minute\n"
        "  bogc bench --dataset my.npz   the benchmark on your own data (see 'bogc data check')\n"
        "  bogc validate --dtype both    the install check in float64 and float32\n\n"
        "A user error prints one line and exits 2; --debug also prints its traceback.",
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                   help="one of: " + ", ".join(COMMANDS))
    p.add_argument("--debug", action="store_true",
                   help="print the full traceback of every error (also BOGC_DEBUG=1)")
    p.add_argument("--version", action="store_true", help="print the version of bogc and exit")
    return p


def _data_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bogc data",
        description="User data sets for 'bogc bench'. A data set is a .npz with 'y' (labels, "
        "shape (n,)), one array per modality named 'x_<modality>' (samples on the first axis) "
        "and optionally a boolean 'test_mask' (n,).",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    check = sub.add_parser(
        "check", help="load a .npz (or a shipped data set name) as 'bogc bench' would and "
        "print its modalities, feature sizes, classes and split",
        description="Load a data set as 'bogc bench --dataset' would; on a problem print the "
        "key at fault and the fix, and exit 2.",
    )
    check.add_argument("dataset", help="path of a .npz file, or a shipped name "
                       "('av-mnist', 'av-digits', 'mfeat')")
    sub.add_parser(
        "convert", add_help=False,
        help="convert the public Scene-15 / PIE .mat files into the .npz format "
        "('bogc data convert --help' for its options)",
    )
    return p


# --------------------------------------------------------------------- commands
def _run_bench(argv: list[str]) -> int:
    bench = importlib.import_module("bogc_core.integrations.bench")
    return int(bench.main(argv) or 0)


def _run_validate(argv: list[str]) -> int:
    from bogc_core.validate import main as validate_main

    return int(validate_main(argv) or 0)


def _run_data(argv: list[str]) -> int:
    parser = _data_parser()
    if argv and argv[0] == "convert":
        try:
            convert = importlib.import_module(_CONVERT_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name != _CONVERT_MODULE:
                raise
            raise UsageError(
                f"data convert: this install of bogc has no converter ({_CONVERT_MODULE} is "
                f"missing); install a bogc version that ships it, or build the .npz yourself "
                f"(see 'bogc data --help' for the format)"
            ) from exc
        return int(convert.main(argv[1:]) or 0)
    args = parser.parse_args(argv)
    if args.action is None:
        parser.print_help()
        return EXIT_USAGE if not argv else 0
    import numpy as np

    from .data import load_dataset

    d = load_dataset(args.dataset, argument="dataset")
    counts = np.bincount(d.y, minlength=d.n_classes)
    n_test = int(d.test_mask.sum())
    split = ("given by test_mask" if d.split_given
             else "no test_mask: a stratified 20% of each class, seed 0")
    print(f"{d.name}: {d.n} samples, {d.n_classes} classes, {d.n - n_test} train / {n_test} test "
          f"({split})")
    for m in d.modalities:
        print(f"  x_{m}: {d.dims()[m]} features")
    shown = ", ".join(f"{c!r}: {int(k)}" for c, k in zip(d.classes[:_SHOWN_CLASSES], counts))
    if d.n_classes > _SHOWN_CLASSES:
        lo, hi = int(counts.min()), int(counts.max())
        shown += (f", ... ({d.n_classes - _SHOWN_CLASSES} more classes; every class has "
                  + (f"{lo}" if lo == hi else f"{lo} to {hi}") + " samples)")
    print(f"  samples per class (label in the file: count): {shown}")
    return 0


_RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "bench": _run_bench,
    "validate": _run_validate,
    "data": _run_data,
}


# --------------------------------------------------------------------- errors
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _missing_package(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one-line message for a missing optional package, or None if it is not one."""
    top = (exc.name or "").split(".")[0]
    if top not in _EXTRA_OF:
        return None
    extras = list(_EXTRAS_OF_COMMAND.get(command, ()))
    if _EXTRA_OF[top] not in extras:
        extras.append(_EXTRA_OF[top])
    return (f"{command}: needs the optional package {top!r}, which is not installed; "
            f'install it with: pip install "bogc[{",".join(extras)}]"')


def _user_error(exc: BaseException, command: str) -> str | None:
    """The one-line message of a user error, or None if ``exc`` is a bug."""
    from bogc_core.errors import BOGCError

    if isinstance(exc, (BOGCError, UsageError)):
        return _one_line(str(exc))
    if isinstance(exc, ModuleNotFoundError):
        return _missing_package(exc, command)
    if isinstance(exc, MemoryError):
        return (f"{command}: out of memory; use a smaller data set or fewer methods "
                f"(e.g. 'bogc bench --quick')")
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else command
        return _one_line(f"{where}: {exc.strerror}; check that the path exists and that "
                         f"you may read (or write) it")
    return None


def _command_of(argv: Sequence[str]) -> tuple[int | None, bool]:
    """Index of the subcommand in ``argv`` (None if there is none) and whether --debug is on."""
    debug = os.environ.get("BOGC_DEBUG", "") not in ("", "0")
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return i, debug or "--debug" in argv
    return None, debug or "--debug" in argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bogc``; returns the exit status (0, 1 for a bug, 2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i, debug = _command_of(argv)
    command = argv[i] if i is not None else ""
    try:
        top = _top_parser()
        # the top-level flags and the command's name ("validate" stands in when there is none)
        flags = top.parse_args(argv[: i + 1] if i is not None else argv + ["validate"])
        if flags.version:
            from importlib.metadata import version

            print(f"bogc {version('bogc')}")
            return 0
        if i is None:
            top.print_help()
            return 0 if argv and not flags.debug else EXIT_USAGE
        rest = [a for a in argv[i + 1 :] if a != "--debug"]
        return _RUNNERS[command](rest)
    except KeyboardInterrupt:
        print("bogc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # a subcommand's own argparse: it has printed its message
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except Exception as exc:
        message = _user_error(exc, command or "bogc")
        if message is None:
            traceback.print_exc()
            print("bogc: internal error: this is a bug in bogc, not in your input; please report "
                  "it with the traceback above", file=sys.stderr)
            return EXIT_BUG
        if debug:
            traceback.print_exc()
        print(f"bogc: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
