"""Convert a public multi-view ``.mat`` file (Scene-15, PIE) into the ``.npz`` format of ``bogc bench``.

Usage::

    python -m bogc_core.integrations.data.convert SOURCE.mat OUT.npz
    bogc data convert SOURCE.mat OUT.npz

The source must be one of the files pinned in :data:`KNOWN` by its sha256
(the multi-view packaging distributed with RCML, AAAI 2024, and earlier
evidential multi-view papers): ``X`` is a 1 x V cell of float64 matrices stored
*features x samples*, ``gt`` the ``(n, 1)`` labels starting at 1. The output
``.npz`` holds ``y`` (labels from 0), ``x_<view>`` ``(n, d_view)`` float32 and
``test_mask``: a fixed stratified 80/20 split, per class
``round(0.2 * n_class)`` test rows drawn by ``numpy.random.default_rng(SPLIT_SEED)``.

These files carry no licence for redistribution: the package never ships
them, it only converts a copy the user obtained.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from bogc_core.errors import BOGCError

__all__ = ["KNOWN", "SPLIT_SEED", "ConvertError", "convert", "main", "stratified_test_mask"]

#: seed of the stratified 80/20 split written as ``test_mask``
SPLIT_SEED = 0
#: sha256 of each accepted source file -> (data set name, view names in the cell order)
KNOWN: dict[str, tuple[str, tuple[str, ...]]] = {
    "52a71c6c675d5b0c1e07189778716bc52b972b17b58d8156c01422bcce2e4442":
        ("scene15", ("gist", "phog", "lbp")),
    "7b7f5b73b140c9e00d6d9a4ed78e0292b298bd12fbcfb2c96125795c7f8150f8":
        ("pie", ("intensity", "lbp", "gabor")),
}


class ConvertError(BOGCError):
    """The source file is not one of the pinned ``.mat`` files, or cannot be written out."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stratified_test_mask(y: np.ndarray, frac: float = 0.2, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean ``(n,)``: per class, ``round(frac * n_class)`` rows (at least 1) drawn at random."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        mask[idx[: max(1, int(round(frac * idx.size)))]] = True
    return mask


def convert(source: str | Path, out: str | Path) -> dict[str, object]:
    """Check ``source`` against :data:`KNOWN`, write ``out``; return a short description."""
    import scipy.io

    src = Path(source)
    if not src.is_file():
        raise ConvertError(f"source: {str(src)!r} is not a file; pass the path of the downloaded .mat")
    digest = sha256(src)
    if digest not in KNOWN:
        raise ConvertError(
            f"source: sha256 {digest} of {str(src)!r} is not one of the pinned files "
            f"({', '.join(n for n, _ in KNOWN.values())}); download the original .mat again"
        )
    name, views = KNOWN[digest]
    mat = scipy.io.loadmat(src)
    cells = mat["X"].reshape(-1)
    y = np.asarray(mat["gt"]).reshape(-1).astype(np.int64) - 1
    xs = {f"x_{v}": np.ascontiguousarray(np.asarray(c, dtype=np.float64).T.astype(np.float32))
          for v, c in zip(views, cells)}
    mask = stratified_test_mask(y)
    dst = Path(out)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"y": y, "test_mask": mask, **xs}
        np.savez_compressed(dst, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    except OSError as exc:
        raise ConvertError(f"out: cannot write {str(dst)!r} ({exc.strerror or exc}); choose a "
                           f"writable path") from None
    return {"name": name, "n": int(y.size), "classes": int(np.unique(y).size),
            "views": {k[2:]: int(v.shape[1]) for k, v in xs.items()}, "test": int(mask.sum()),
            "out": str(dst)}


def main(argv: list[str] | None = None) -> int:
    """``convert SOURCE.mat OUT.npz``; prints what was written, returns 2 on a user error."""
    p = argparse.ArgumentParser(
        prog="bogc data convert",
        description="Convert the public Scene-15 or PIE multi-view .mat (checked by sha256) into "
        "the .npz format of bogc bench, with a fixed stratified 80/20 test_mask (seed "
        f"{SPLIT_SEED}).",
    )
    p.add_argument("source", help="the downloaded scene15_mtv.mat or PIE_face_10.mat")
    p.add_argument("out", help="the .npz file to write")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        info = convert(args.source, args.out)
    except BOGCError as exc:
        print(f"bogc data convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['name']}: {info['n']} samples, {info['classes']} classes, views {info['views']}, "
          f"{info['test']} test rows")
    print(f"wrote {info['out']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
