"""Build the data sets shipped in ``bogc_core.integrations.data`` from the raw public downloads.

Run once, by a maintainer, after checking the source files' sha256 sums::

    python scripts/build_data.py --src RAW_DATA_DIR [--dst integrations/data]

``RAW_DATA_DIR`` holds the downloads in folders ``uci_mfeat_handwritten/``,
``fsdd/`` and ``mnist_t10k/`` (see ``integrations/data/README.md``).

Writes three compressed ``.npz`` files in the user-data format of API.md
(``y``, ``x_<modality>``, boolean ``test_mask``):

``mfeat.npz``
    UCI Multiple Features (TMC packaging, fixed 1600/400 split), six views
    ``pix`` (240, uint8), ``fou`` (76), ``fac`` (216, uint16), ``zer`` (47),
    ``kar`` (64), ``mor`` (6); real-valued views stored as float16 of the raw
    values. Rows: the 1600 training rows, then the 400 test rows.
``av-digits.npz``
    FSDD v1.0.10 spoken digits (``audio``: log-mel spectrogram, 32 mel bands
    x 12 equal time segments, float16) paired *by class* with MNIST t10k
    images (``image``: 28x28 averaged down to 14x14, uint8), following the
    recipe of the data README: FSDD's official split (takes 0-4 test),
    MNIST pool 0-4999 for training pairs and 5000-9999 for test pairs, each
    clip given a distinct image of its digit drawn without replacement with
    ``numpy.random.default_rng(20261129)``.
``av-mnist.npz``
    The ``av-digits`` rows and pairs made hard the AV-MNIST way (Vielzeuf et
    al. 2018, MultiBench): ``image``: the 14x14 images with the leading
    principal components carrying ``PCA_REMOVED`` (75 %) of the training
    images' variance projected out (PCA fitted on the training rows only),
    rounded, int16; ``audio``: each clip plus white noise at ``SNR_DB``
    (-10 dB) drawn with ``numpy.random.default_rng(NOISE_SEED)`` in row order,
    then the same log-mel features, float16. ``pca_components`` and
    ``pca_removed`` record k and the variance share removed.

The package never reads the raw downloads at run time; only this script does.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import wave
from pathlib import Path

import numpy as np
import scipy.io
import scipy.signal
from bogc_core.integrations.data.pca_energy import fit_pca_removal

SR = 8000
N_FFT = 256
HOP = 64
N_MELS = 32
N_SEGMENTS = 12
PAIR_SEED = 20261129
MFEAT_VIEWS = ("pix", "fou", "fac", "zer", "kar", "mor")
#: av-mnist: share of the training images' variance projected out, and the audio noise
PCA_REMOVED = 0.75
SNR_DB = -10.0
NOISE_SEED = 20261205


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_wav(path: Path) -> np.ndarray:
    """Mono 16-bit PCM wav -> float64 samples in [-1, 1)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SR:
            raise ValueError(f"{path}: expected mono 16-bit {SR} Hz PCM")
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SR) -> np.ndarray:
    """Triangular filters equally spaced on the HTK mel scale, shape (n_mels, n_fft//2 + 1)."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_mels, freqs.size))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(up, down))
    return fb


def log_mel_segments(x: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram averaged over ``N_SEGMENTS`` equal time segments -> (N_MELS*N_SEGMENTS,).

    Equal segments (rather than a fixed frame count) make clips of 0.14-2.3 s
    comparable without padding; the log is taken before averaging.
    """
    _, _, z = scipy.signal.stft(
        x, fs=SR, window="hann", nperseg=N_FFT, noverlap=N_FFT - HOP, boundary="even", padded=True
    )
    power = np.abs(z) ** 2  # (freq, frames)
    logmel = np.log(fb @ power + 1e-6)  # (mels, frames)
    segs = np.array_split(np.arange(logmel.shape[1]), N_SEGMENTS)
    return np.stack([logmel[:, s].mean(axis=1) for s in segs], axis=1).reshape(-1)


def fsdd_rows(src: Path) -> list[dict[str, str]]:
    """FSDD's manifest rows: the training clips, then the test clips, each by digit, speaker, take."""
    rows = list(csv.DictReader(open(src / "fsdd" / "manifest.csv", newline="")))
    rows.sort(key=lambda r: (r["official_split"] != "train", int(r["digit"]), r["speaker"], int(r["take"])))
    return rows


def mnist_t10k(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST t10k images averaged over 2x2 blocks and rounded, ``(10000, 196)`` uint8, and labels."""
    with gzip.open(src / "mnist_t10k" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(src / "mnist_t10k" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    small = images.reshape(-1, 14, 2, 14, 2).astype(np.float64).mean(axis=(2, 4))
    return np.rint(small).astype(np.uint8).reshape(-1, 196), labels


def pair_by_class(y: np.ndarray, test: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """MNIST index of every clip: a distinct image of its digit, from indices 0-4999 for
    training clips and 5000-9999 for test clips, drawn with ``default_rng(PAIR_SEED)``."""
    rng = np.random.default_rng(PAIR_SEED)
    pools = {False: np.arange(0, 5000), True: np.arange(5000, 10000)}
    image_idx = np.empty(y.size, dtype=np.int64)
    for is_test, pool in pools.items():
        for digit in range(10):
            clips = np.flatnonzero((test == is_test) & (y == digit))
            candidates = rng.permutation(pool[labels[pool] == digit])
            image_idx[clips] = candidates[: clips.size]  # distinct: without replacement
    assert np.all(labels[image_idx] == y)
    return image_idx


def add_white_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus Gaussian white noise whose power is the clip's mean power over ``10^(snr/10)``."""
    power = float(np.mean(x**2))
    return x + rng.standard_normal(x.size) * np.sqrt(power / 10.0 ** (snr_db / 10.0))


def build_av_digits(src: Path) -> dict[str, np.ndarray]:
    rows = fsdd_rows(src)
    fb = mel_filterbank()
    audio = np.stack([log_mel_segments(read_wav(src / "fsdd" / r["path"]), fb) for r in rows])
    y = np.array([int(r["digit"]) for r in rows], dtype=np.int64)
    test = np.array([r["official_split"] == "test" for r in rows])
    small, labels = mnist_t10k(src)
    image_idx = pair_by_class(y, test, labels)
    return {
        "y": y,
        "x_audio": audio.astype(np.float16),
        "x_image": small[image_idx],
        "test_mask": test,
        "mnist_index": image_idx.astype(np.int32),
    }


def build_av_mnist(src: Path) -> dict[str, np.ndarray]:
    rows = fsdd_rows(src)
    fb = mel_filterbank()
    rng = np.random.default_rng(NOISE_SEED)  # one draw per clip, in row order
    audio = np.stack([
        log_mel_segments(add_white_noise(read_wav(src / "fsdd" / r["path"]), SNR_DB, rng), fb)
        for r in rows
    ])
    y = np.array([int(r["digit"]) for r in rows], dtype=np.int64)
    test = np.array([r["official_split"] == "test" for r in rows])
    small, labels = mnist_t10k(src)
    image_idx = pair_by_class(y, test, labels)
    images = small[image_idx].astype(np.float64)
    removal = fit_pca_removal(images[~test], PCA_REMOVED)  # training rows only
    return {
        "y": y,
        "x_audio": audio.astype(np.float16),
        "x_image": np.rint(removal.apply(images)).astype(np.int16),  # whole grey levels
        "test_mask": test,
        "mnist_index": image_idx.astype(np.int32),
        "pca_components": np.int32(removal.components.shape[0]),
        "pca_removed": np.float64(removal.removed),
    }


def build_mfeat(src: Path) -> dict[str, np.ndarray]:
    m = scipy.io.loadmat(src / "uci_mfeat_handwritten" / "handwritten_6views.mat")
    out: dict[str, np.ndarray] = {}
    y = np.concatenate([m["gt_train"].ravel(), m["gt_test"].ravel()]).astype(np.int64) - 1
    out["y"] = y
    for v, name in enumerate(MFEAT_VIEWS, start=1):
        x = np.concatenate([m[f"x{v}_train"], m[f"x{v}_test"]])
        if name == "pix":
            x = x.astype(np.uint8)
        elif name == "fac":
            x = x.astype(np.uint16)
        else:
            x = x.astype(np.float16)
        out[f"x_{name}"] = x
    n_train = m["gt_train"].size
    out["test_mask"] = np.arange(y.size) >= n_train
    return out


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="folder of the raw downloads")
    p.add_argument("--dst", type=Path, default=here / "integrations" / "data")
    args = p.parse_args(argv)
    expected = {
        "uci_mfeat_handwritten/handwritten_6views.mat": "d731ec02aaa97cf9a5826df68b0dd1e73ba61a82ba3c8f64606ba402926c885b",
        "mnist_t10k/t10k-images-idx3-ubyte.gz": "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
        "mnist_t10k/t10k-labels-idx1-ubyte.gz": "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
        "fsdd/manifest.csv": "325a4a46f44b4d0f9105ff71034971b855e0ce1db080f72153362817e868140e",
    }
    for rel, digest in expected.items():
        if sha256(args.src / rel) != digest:
            raise SystemExit(f"{rel}: sha256 mismatch; refusing to build from a changed source")
    builders = (("mfeat", build_mfeat), ("av-digits", build_av_digits), ("av-mnist", build_av_mnist))
    for name, builder in builders:
        arrays = builder(args.src)
        path = args.dst / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): "
              + ", ".join(f"{k}{v.shape}:{v.dtype}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
