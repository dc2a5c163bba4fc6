"""``bogc bench --setting zeroshot``: the class split, the InfoNCE source, retrieval, the refusal."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bogc_core.integrations.bench import main
from bogc_core.integrations.bench.methods import build
from bogc_core.integrations.bench.methods.base import fusion_only_grads
from bogc_core.integrations.bench.model import ALIGN, FUSION
from bogc_core.integrations.bench.settings import make_split
from bogc_core.integrations.bench.zeroshot import (
    TEMPERATURE,
    AlignedNet,
    class_split,
    info_nce,
    retrieval,
)
from bogc_core.integrations.data import load_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from bogc_core.errors import BOGCError, ConfigError

TINY = ["--seeds", "2", "--tune-seeds", "1", "--epochs", "1", "--max-epochs", "2", "--patience", "1",
        "--no-progress", "--jobs", "1"]


def _toy(tmp_path, n_classes=6, n_per=20, name="toy.npz"):
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(n_classes), n_per)
    path = tmp_path / name
    np.savez(path, y=y, x_a=rng.normal(size=(n_classes, 4))[y] + rng.normal(size=(y.size, 4)),
             x_b=rng.normal(size=(n_classes, 3))[y] + rng.normal(size=(y.size, 3)))
    return path


# ---------------------------------------------------------------- the class split
@settings(max_examples=60, deadline=None)
@given(st.integers(4, 300), st.integers(0, 2**31 - 1))
def test_class_split_is_disjoint_sized_and_seeded(C, seed):
    seen, unseen = class_split(C, seed)
    assert set(seen).isdisjoint(unseen) and sorted(seen + unseen) == list(range(C))
    assert len(unseen) == max(3, math.floor(0.3 * C + 0.5))
    assert seen == sorted(seen) and unseen == sorted(unseen)
    assert class_split(C, seed) == (seen, unseen)


def test_class_split_depends_on_the_seed():
    assert len({tuple(class_split(10, s)[1]) for s in range(20)}) > 5


def test_zeroshot_split_rows_labels_and_standardisation():
    data = load_dataset("av-digits")
    split = make_split(data, "zeroshot")
    seen, unseen = split.info["seen_classes"], split.info["unseen_classes"]
    assert (seen, unseen) == class_split(data.n_classes)
    assert split.n_classes == len(seen)
    # training and validation: seen classes' rows of the training split, renumbered
    train_rows = ~data.test_mask & np.isin(data.y, seen)
    assert split.y_train.size + split.y_val.size == int(train_rows.sum())
    assert set(np.unique(split.y_train)) == set(range(len(seen)))
    # the test: every unseen-class row, original ids
    assert split.y_test.size == int(np.isin(data.y, unseen).sum())
    assert set(np.unique(split.y_test)) == set(unseen)
    for x in split.train:
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fewer_than_four_classes_are_refused(tmp_path, capsys, n_classes):
    data = load_dataset(_toy(tmp_path, n_classes=n_classes))
    with pytest.raises(ConfigError, match="at least 4 classes") as exc:
        make_split(data, "zeroshot")
    assert isinstance(exc.value, BOGCError) and "--setting" in str(exc.value)
    rc = main(["--dataset", str(_toy(tmp_path, n_classes=n_classes)), "--setting", "zeroshot",
               "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "zeroshot needs at least 4 classes" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_four_classes_are_enough_and_train_on_the_one_seen_class(tmp_path):
    split = make_split(load_dataset(_toy(tmp_path, n_classes=4)), "zeroshot")
    assert len(split.info["unseen_classes"]) == 3 and split.n_classes == 1
    assert set(np.unique(split.y_train)) == {0} and split.y_test.size == 60


def test_one_modality_is_refused(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, y=np.repeat(np.arange(5), 10), x_a=np.random.default_rng(0).normal(size=(50, 3)))
    with pytest.raises(ConfigError, match="at least 2"):
        make_split(load_dataset(path), "zeroshot")


# ---------------------------------------------------------------- the align loss
def _info_nce_brute(embs, tau):
    """Symmetric InfoNCE per example, by explicit sums over the batch, float64."""
    E = [e.double().numpy() for e in embs]
    B = E[0].shape[0]
    pairs = list(itertools.combinations(range(len(E)), 2))
    out = np.zeros(B)
    for a, b in pairs:
        for i in range(B):
            row = [math.exp(E[a][i] @ E[b][j] / tau) for j in range(B)]
            col = [math.exp(E[a][j] @ E[b][i] / tau) for j in range(B)]
            li = -math.log(row[i] / sum(row))
            lj = -math.log(col[i] / sum(col))
            out[i] += 0.5 * (li + lj)
    return out / len(pairs)


@pytest.mark.parametrize("M", [2, 3])
def test_info_nce_against_a_brute_force_sum(M):
    g = torch.Generator().manual_seed(M)
    embs = [F.normalize(torch.randn(7, 5, generator=g), dim=1) for _ in range(M)]
    got = info_nce(embs).double().numpy()
    np.testing.assert_allclose(got, _info_nce_brute(embs, TEMPERATURE), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info_nce(embs, 0.5).double().numpy(), _info_nce_brute(embs, 0.5),
                               rtol=1e-5, atol=1e-6)


def test_info_nce_two_modalities_is_clip_loss():
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(6, 4, generator=g), dim=1) for _ in range(2))
    logits = a @ b.T / TEMPERATURE
    t = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    torch.testing.assert_close(info_nce([a, b]).mean(), clip)


# ---------------------------------------------------------------- retrieval
def _retrieval_brute(E, y):
    hits, exact = [], []
    for q in range(len(E)):
        for g in range(len(E)):
            if q == g:
                continue
            for i in range(len(y)):
                best, best_j = -np.inf, -1
                for j in range(len(y)):
                    s = float(np.dot(E[q][i], E[g][j]))
                    if s > best:  # first index on ties
                        best, best_j = s, j
                hits.append(y[best_j] == y[i])
                exact.append(best_j == i)
    return np.array(hits), float(np.mean(exact))


@pytest.mark.parametrize("M", [2, 3])
def test_retrieval_against_a_brute_force_loop(M):
    rng = np.random.default_rng(M)
    y = np.array([5, 5, 7, 7, 9, 9, 9, 5])
    E = [rng.normal(size=(8, 3)) for _ in range(M)]
    E[0][3] = E[0][2]  # a tie in the gallery of queries from other modalities
    r = retrieval(E, y)
    hits, rec = _retrieval_brute(E, y)
    np.testing.assert_array_equal(r["correct"], hits)
    assert r["accuracy"] == pytest.approx(hits.mean())
    assert r["recall_at_1"] == pytest.approx(rec)
    # per query modality: the mean over its own directions
    per = hits.reshape(M, M - 1, 8).mean(axis=(1, 2))
    for q in range(M):
        assert r["by_query"][q][0] == pytest.approx(per[q])


def test_retrieval_of_identical_embeddings_is_perfect():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(10, 4))
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # unit rows: each is its own nearest neighbour
    r = retrieval([e, e.copy()], np.arange(10) % 3)
    assert r["accuracy"] == 1.0 and r["recall_at_1"] == 1.0


# ---------------------------------------------------------------- the model and the methods
def _aligned(seed=0, B=12):
    torch.manual_seed(seed)
    model = AlignedNet({"a": 4, "b": 3}, 3, hidden=8, feat=5)
    xs = [torch.randn(B, 4), torch.randn(B, 3)]
    y = torch.randint(0, 3, (B,))
    z, zs = model(xs)
    losses = {FUSION: F.cross_entropy(z, y, reduction="none")}
    for m, u in zip(model.modalities, zs):
        losses[m] = F.cross_entropy(u, y, reduction="none")
    losses[ALIGN] = info_nce(model.last_embeddings)
    return model, losses


def test_aligned_param_groups_match_autograd_reach():
    model, losses = _aligned()
    params = list(model.parameters())
    groups = model.param_groups()
    assert sorted(id(p) for g, _ in groups for p in g) == sorted(id(p) for p in params)
    for group, srcs in groups:
        for s, loss in losses.items():
            gs = torch.autograd.grad(loss.mean(), group, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().sum() > 0) for g in gs)
            assert reached == (s in srcs), (s, srcs)


def test_fusion_only_in_zeroshot_trains_the_trunk_on_fusion_and_align():
    model, losses = _aligned()
    heads = {id(p) for h in model.heads for p in h.parameters()}
    trunk = [p for p in model.parameters() if id(p) not in heads]
    want = torch.autograd.grad(losses[FUSION].mean() + losses[ALIGN].mean(), trunk,
                               retain_graph=True, allow_unused=True)
    fusion_only_grads(model, losses)
    for p, g in zip(trunk, want):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g)


def test_bogc_in_zeroshot_runs_without_the_row_shortcut():
    model, losses = _aligned()
    method = build("bogc")
    method.setup(model)
    diag = method.cal.backward(losses)
    assert diag["shortcut_parameters"] == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_cli_zeroshot_run_records_the_split_and_recall(tmp_path):
    rc = main(["--dataset", str(_toy(tmp_path, n_classes=8)), "--setting", "zeroshot",
               "--methods", "sum,bogc,pcgrad,mmpareto,fusion_only,ogm_ge,mgda",
               "--out", str(tmp_path / "o"), *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["setting"] == "zeroshot"
    seen, unseen = class_split(8)
    assert doc["split"]["unseen_classes"] == unseen and doc["split"]["seen_classes"] == seen
    assert doc["split"]["n_test"] == 20 * len(unseen)
    z = doc["zeroshot"]
    assert z["chance_class_accuracy"] == pytest.approx(1 / len(unseen))
    for name, e in doc["methods"].items():
        assert 0.0 <= e["accuracy_mean"] <= 1.0
        assert len(z["methods"][name]["recall_at_1s"]) == 2
        assert set(e["unimodal_accuracy_mean"]) == {"a", "b"}
