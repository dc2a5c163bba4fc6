"""Shipped data sets and the user ``.npz`` format."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bogc_core.integrations.bench.settings import make_split
from bogc_core.integrations.data import SHIPPED, DataError, load_dataset

from bogc_core import BOGCError

REPO = Path(__file__).resolve().parents[2]
# The raw downloads scripts/build_data.py reads, given explicitly (never a fixed path).
SRC = Path(os.environ["BOGC_RAW_DATA"]) if os.environ.get("BOGC_RAW_DATA") else None


def test_av_digits_follows_the_recipe():
    d = load_dataset("av-digits")
    assert d.modalities == ("audio", "image")
    assert d.dims() == {"audio": 384, "image": 196}
    assert d.n == 3000 and d.test_mask.sum() == 300 and d.split_given
    for c in range(10):
        assert (d.y[~d.test_mask] == c).sum() == 270
        assert (d.y[d.test_mask] == c).sum() == 30
    with np.load(SHIPPED["av-digits"]) as z:
        idx = z["mnist_index"]
    assert np.unique(idx).size == idx.size  # every clip has its own image
    assert idx[~d.test_mask].max() < 5000 and idx[d.test_mask].min() >= 5000
    assert d.x["image"].min() >= 0 and d.x["image"].max() <= 255


def test_av_mnist_shapes_dtypes_and_classes():
    d = load_dataset("av-mnist")
    assert d.name == "av-mnist" and d.modalities == ("audio", "image")
    assert d.dims() == {"audio": 384, "image": 196}
    assert d.n == 3000 and d.test_mask.sum() == 300 and d.split_given
    assert d.n_classes == 10 and d.classes == tuple(range(10))
    assert d.y.dtype == np.int64 and all(v.dtype == np.float32 for v in d.x.values())
    for c in range(10):
        assert (d.y[~d.test_mask] == c).sum() == 270
        assert (d.y[d.test_mask] == c).sum() == 30
    with np.load(SHIPPED["av-mnist"]) as z:
        assert z["x_audio"].dtype == np.float16 and z["x_image"].dtype == np.int16


def test_av_mnist_images_are_the_av_digits_images_with_75_percent_of_the_energy_removed():
    # Independent of the build: the same pairs as av-digits (whose images are the clean
    # 14x14 MNIST digits), so the removal can be recomputed here with an SVD of the
    # clean training images and compared pixel by pixel, up to the rounding to whole grey levels.
    with np.load(SHIPPED["av-mnist"]) as m, np.load(SHIPPED["av-digits"]) as a:
        for k in ("y", "test_mask", "mnist_index"):
            np.testing.assert_array_equal(m[k], a[k])
        weak, clean, train = m["x_image"].astype(np.float64), a["x_image"].astype(np.float64), \
            ~a["test_mask"]
        k_stored, removed_stored = int(m["pca_components"]), float(m["pca_removed"])
    mu = clean[train].mean(axis=0)
    _, s, vt = np.linalg.svd(clean[train] - mu, full_matrices=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(share >= 0.75)) + 1
    assert share[k - 2] < 0.75 <= share[k - 1]
    assert k == k_stored and removed_stored == pytest.approx(share[k - 1], abs=1e-9)
    lead = vt[:k]
    expected = clean - (clean - mu) @ lead.T @ lead
    assert np.abs(weak - expected).max() <= 0.5 + 1e-6  # rounding only
    # on the training rows, the energy taken away is the 75 % share (rounding aside)
    centred = clean[train] - mu
    removed = 1 - np.sum((weak[train] - mu) ** 2) / np.sum(centred**2)
    assert removed == pytest.approx(share[k - 1], abs=2e-3) and removed >= 0.75
    # what is left is (up to rounding) orthogonal to every removed direction:
    # |rounding error . v| <= 0.5 * ||v||_1 for a unit vector v
    proj = np.abs((weak - mu) @ lead.T)
    assert np.all(proj <= 0.5 * np.abs(lead).sum(axis=1) + 1e-6)


def test_av_mnist_audio_is_the_av_digits_audio_under_noise():
    # White noise adds power in every mel band, so the noisy clip's log-mel lies above the
    # clean one almost everywhere, and by several nats on average at -10 dB SNR.
    with np.load(SHIPPED["av-mnist"]) as m, np.load(SHIPPED["av-digits"]) as a:
        noisy, clean = m["x_audio"].astype(np.float64), a["x_audio"].astype(np.float64)
    lift = noisy - clean
    assert (lift > 0).mean() > 0.95
    assert lift.mean() > 1.0


def test_mfeat_views_and_split():
    d = load_dataset("mfeat")
    assert d.modalities == ("pix", "fou", "fac", "zer", "kar", "mor")
    assert d.dims() == {"pix": 240, "fou": 76, "fac": 216, "zer": 47, "kar": 64, "mor": 6}
    assert d.n == 2000 and d.test_mask.sum() == 400 and not d.test_mask[:1600].any()
    assert np.bincount(d.y[d.test_mask]).tolist() == [40] * 10
    assert set(np.unique(d.x["pix"])) <= set(range(7))


def test_shipped_files_are_compact():
    assert sum(p.stat().st_size for p in SHIPPED.values()) < 6e6
    here = Path(SHIPPED["mfeat"]).parent
    for lic in ("LICENSE-CC-BY-SA-4.0.txt", "LICENSE-CC-BY-SA-3.0.txt", "LICENSE-CC-BY-4.0.txt", "README.md"):
        assert (here / lic).is_file(), lic


def test_package_names_no_absolute_path():
    # The package reads only its own files and the paths it is given: no string
    # literal in the data and experiment modules is an absolute path.
    for folder in ("integrations/data", "integrations/bench", "integrations/bench/methods"):
        for p in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    v = node.value
                    assert not (v.startswith("/") and len(v) > 1 and v[1].isalpha()), (p, v)


def test_user_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.array([3, 7, 9]), 20)
    a = rng.normal(size=(60, 2, 3))
    b = rng.integers(0, 5, size=(60, 4)).astype(np.uint8)
    mask = np.zeros(60, dtype=bool)
    mask[::5] = True
    np.savez(tmp_path / "mine.npz", y=y, x_a=a, x_b=b, test_mask=mask, other=np.arange(3))
    a_copy = a.copy()
    d = load_dataset(tmp_path / "mine.npz")
    assert d.name == "mine" and d.modalities == ("a", "b") and d.n_classes == 3
    np.testing.assert_array_equal(d.y, np.searchsorted([3, 7, 9], y))
    np.testing.assert_allclose(d.x["a"], a.reshape(60, 6).astype(np.float32))
    np.testing.assert_array_equal(d.test_mask, mask)
    np.testing.assert_array_equal(a, a_copy)


def test_user_npz_without_mask_gets_a_stratified_split(tmp_path):
    y = np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "m.npz", y=y, x_v=np.ones((100, 2)))
    d = load_dataset(tmp_path / "m.npz")
    assert not d.split_given
    assert np.bincount(d.y[d.test_mask]).tolist() == [5, 5, 5, 5]


@pytest.mark.parametrize(
    "arrays, word",
    [
        ({"x_a": np.ones((4, 2))}, "'y'"),
        ({"y": np.arange(4) % 2}, "x_<modality>"),
        ({"y": np.arange(4) % 2, "x_a": np.ones((5, 2))}, "x_a"),
        ({"y": np.arange(4) % 2, "x_a": np.ones((4, 2)), "test_mask": np.ones(4)}, "test_mask"),
        ({"y": np.arange(4) % 2, "x_a": np.full((4, 2), np.nan)}, "x_a"),
    ],
)
def test_malformed_npz_raises_a_named_error(tmp_path, arrays, word):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BOGCError, match=word.replace("<", ".").replace(">", ".").replace("'", ".")):
        load_dataset(tmp_path / "bad.npz")


def test_unknown_name_raises():
    with pytest.raises(DataError, match="name_or_path"):
        load_dataset("no-such-data")


def test_settings_fewshot_noisy_and_validation_carve():
    d = load_dataset("av-digits")
    std = make_split(d, "standard")
    assert std.y_train.size + std.y_val.size == 2700 and std.y_test.size == 300
    # standardised with the statistics of the rows trained on (the validation carve excluded)
    assert np.abs(std.train[0].mean(0)).max() < 1e-3
    few = make_split(d, "fewshot", seed=3, shots=5)
    assert np.bincount(few.y_train).tolist() == [5] * 10
    assert not np.array_equal(make_split(d, "fewshot", seed=4, shots=5).train[0], few.train[0])
    noisy = make_split(d, "noisy", noise_std=2.0, noise_modality="image")
    np.testing.assert_array_equal(noisy.train[0], std.train[0])
    diff = noisy.test[1] - std.test[1]
    assert 1.9 < diff.std() < 2.1


@pytest.mark.slow
@pytest.mark.skipif(SRC is None or not SRC.is_dir(),
                    reason="set BOGC_RAW_DATA to the folder of raw downloads to rebuild the data")
def test_build_script_reproduces_the_shipped_files(tmp_path):
    assert SRC is not None
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_data.py"), "--src", str(SRC),
                    "--dst", str(tmp_path)], check=True, capture_output=True)
    for name, path in SHIPPED.items():
        with np.load(path) as a, np.load(tmp_path / f"{name}.npz") as b:
            assert a.files == b.files
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])
