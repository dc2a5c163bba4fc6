"""JAX: the core on ``jax.numpy`` arrays, and ``calibrate_pytrees`` eager and under ``jax.jit``.

Expected values come from the core on NumPy float64 (itself checked against
an independent NumPy transcription in tests/core) and, for the pipeline, from
``tests/oracle.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import oracle  # noqa: E402  (tests/ is on pytest's pythonpath)
from bogc_core.integrations.jax import calibrate_pytrees, per_source_stats  # noqa: E402

import bogc_core as bc  # noqa: E402

CONFIGS = {
    "default": bc.CalibrationConfig(),
    "dempster": bc.CalibrationConfig(weights="dempster", prior_weight=2.0),
    "precision": bc.CalibrationConfig(evidence_from="precision", gamma=1.0),
    "uniform-none": bc.CalibrationConfig(weights="uniform", scale="none"),
    "s_max": bc.CalibrationConfig(s_max=1.1, gamma=2.0),
    "prior": bc.CalibrationConfig(prior=bc.NormalGammaPrior(0.1, 2.0, 1.5, 0.3)),
}


def _trees(
    rng: np.random.Generator, n: int = 8, noise: tuple[float, ...] = (0.5, 2.0, 1.0)
) -> dict:
    """Per-source pytrees: a nested dict with a matrix and a vector leaf, samples first."""
    signal = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
    return {
        f"s{k}": {
            "layer": {"w": signal["w"] + s * rng.normal(size=(n, 3, 2))},
            "b": (k + 1) * signal["b"] + s * rng.normal(size=(n, 4)),
        }
        for k, s in enumerate(noise)
    }


def _to_jax(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), tree)


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _core_numpy(trees: dict, cfg: bc.CalibrationConfig, lambdas: Any = None) -> list[Any]:
    """The core on NumPy float64, one leaf at a time (or pooled for scope='global')."""
    names = list(trees)
    per_leaf = list(zip(*[jax.tree_util.tree_leaves(trees[k]) for k in names], strict=True))
    stats = [
        {k: bc.GradientStats.from_samples(x) for k, x in zip(names, xs, strict=True)}
        for xs in per_leaf
    ]
    lam = None if lambdas is None else dict(zip(names, lambdas, strict=True))
    return bc.calibrate_tensors(stats, cfg, lam)


@pytest.fixture
def x64() -> Any:
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_matches_core_float64(x64: Any, name: str, scope: str) -> None:
    rng = np.random.default_rng(1)
    trees = _trees(rng)
    cfg = dataclasses.replace(CONFIGS[name], scope=scope)
    lambdas = [1.0, 0.5, 2.0]
    # Under jit (one compilation per configuration); eager is the same code, checked below.
    fn = jax.jit(lambda t: calibrate_pytrees(t, cfg, lambdas, return_info=True))
    got, info = fn(_to_jax(trees, jnp.float64))
    want = _core_numpy(trees, cfg, lambdas)
    for g, w in zip(_leaves(got), want, strict=True):
        np.testing.assert_allclose(g, w.gradient, rtol=1e-10, atol=1e-12)
    is_info = lambda x: isinstance(x, dict) and "weights" in x  # noqa: E731
    for inf, w in zip(jax.tree_util.tree_leaves(info, is_leaf=is_info), want, strict=True):
        for key in ("weights", "uncertainty", "belief_scale", "evidence"):
            np.testing.assert_allclose(
                np.asarray(inf[key]), getattr(w, key), rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_eager_matches_core_float64(x64: Any, scope: str) -> None:
    trees = _trees(np.random.default_rng(11))
    cfg = bc.CalibrationConfig(scope=scope)
    got = calibrate_pytrees(_to_jax(trees, jnp.float64), cfg)
    for g, w in zip(_leaves(got), _core_numpy(trees, cfg), strict=True):
        np.testing.assert_allclose(g, w.gradient, rtol=1e-10, atol=1e-12)


def test_matches_independent_oracle(x64: Any) -> None:
    rng = np.random.default_rng(2)
    trees = _trees(rng)
    got = calibrate_pytrees(_to_jax(trees, jnp.float64))
    names = list(trees)
    for i, g in enumerate(_leaves(got)):
        samples = [jax.tree_util.tree_leaves(trees[k])[i] for k in names]
        want_g = oracle.calibrate([oracle.stats_of(x) for x in samples])[0]
        np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["default", "dempster", "prior"])
def test_jit_equals_eager_float32(name: str) -> None:
    rng = np.random.default_rng(3)
    trees = _to_jax(_trees(rng), jnp.float32)
    cfg = CONFIGS[name]
    eager = calibrate_pytrees(trees, cfg)
    jitted = jax.jit(lambda t: calibrate_pytrees(t, cfg))(trees)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    for a, b in zip(_leaves(jitted), _leaves(eager), strict=True):
        assert a.dtype == np.float64  # (converted by _leaves)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(jitted))
    # And against the float64 core, within float32 accuracy.
    for a, w in zip(
        _leaves(jitted), _core_numpy(_trees(np.random.default_rng(3)), cfg), strict=True
    ):
        np.testing.assert_allclose(a, w.gradient, rtol=2e-4, atol=1e-5)


def test_zero_variance_source_under_jit_gives_plain_sum(x64: Any) -> None:
    rng = np.random.default_rng(4)
    means = rng.normal(size=(2, 5))
    trees = [{"p": jnp.asarray(np.broadcast_to(m, (6, 5)))} for m in means]
    got = jax.jit(calibrate_pytrees)(trees)
    np.testing.assert_allclose(np.asarray(got["p"]), means.sum(axis=0), rtol=1e-12)
    core = bc.calibrate([bc.GradientStats.from_samples(np.broadcast_to(m, (6, 5))) for m in means])
    np.testing.assert_allclose(np.asarray(got["p"]), core.gradient, rtol=1e-12)


def test_per_source_stats_are_sample_moments(x64: Any) -> None:
    rng = np.random.default_rng(5)
    trees = _trees(rng, n=5)
    names, stats, treedef = per_source_stats(_to_jax(trees, jnp.float64))
    assert names == list(trees)
    for k, name in enumerate(names):
        for st, x in zip(stats[k], jax.tree_util.tree_leaves(trees[name]), strict=True):
            np.testing.assert_allclose(np.asarray(st.mean), x.mean(axis=0), rtol=1e-12)
            np.testing.assert_allclose(np.asarray(st.m2), ((x - x.mean(0)) ** 2).sum(0), rtol=1e-12)
            assert float(st.count) == 5.0


def test_inputs_are_left_alone() -> None:
    rng = np.random.default_rng(6)
    trees = _to_jax(_trees(rng), jnp.float32)
    copies = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(trees)]
    jax.jit(calibrate_pytrees)(trees)
    for x, c in zip(jax.tree_util.tree_leaves(trees), copies, strict=True):
        np.testing.assert_array_equal(np.asarray(x), c)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda t: {"a": t["s0"], "b": {"b": t["s1"]["b"]}}, bc.ShapeError, "tree structure"),
        (
            lambda t: {"a": {"p": t["s0"]["b"]}, "b": {"p": t["s1"]["b"][:, :3]}},
            bc.ShapeError,
            "parameter shape",
        ),
        (
            lambda t: {"a": {"p": t["s0"]["b"][:1]}, "b": {"p": t["s1"]["b"][:1]}},
            bc.InsufficientSamplesError,
            "beta0",
        ),
        (
            lambda t: {
                "a": {"p": jnp.ones((4, 2), dtype=jnp.int32)},
                "b": {"p": jnp.ones((4, 2), dtype=jnp.int32)},
            },
            bc.DTypeError,
            "float",
        ),
        (
            lambda t: {"a": {"p": t["s0"]["b"].at[0, 0].set(jnp.nan)}, "b": {"p": t["s1"]["b"]}},
            bc.NonFiniteError,
            "NaN",
        ),
        (lambda t: [], bc.ShapeError, "empty"),
        (lambda t: t["s0"]["b"], bc.ShapeError, "mapping"),
    ],
    ids=["structure", "shape", "one-sample", "int", "nan", "empty", "bare-array"],
)
def test_bad_input_raises_clear_bogc_error(make: Any, error: type, words: str) -> None:
    trees = _to_jax(_trees(np.random.default_rng(7)), jnp.float32)
    with pytest.raises(error, match=words) as exc:
        calibrate_pytrees(make(trees))
    assert isinstance(exc.value, bc.BOGCError)
    assert "grads" in str(exc.value) or "dtype" in str(exc.value)


def test_bad_options_raise() -> None:
    trees = _to_jax(_trees(np.random.default_rng(8)), jnp.float32)
    with pytest.raises(bc.ShapeError, match="source_weights"):
        calibrate_pytrees(trees, source_weights=[1.0, 2.0])
    with pytest.raises(bc.ShapeError, match="missing"):
        calibrate_pytrees(trees, source_weights={"s0": 1.0})
    with pytest.raises(bc.ConfigError, match="fast_path"):
        calibrate_pytrees(trees, bc.CalibrationConfig(fast_path="torch-fused"))
    with pytest.raises(bc.ConfigError, match="config"):
        calibrate_pytrees(trees, config={"gamma": 0.5})


def test_one_sample_is_fine_with_explicit_beta0() -> None:
    trees = [{"p": jnp.ones((1, 3)) * c} for c in (1.0, 2.0)]
    cfg = bc.CalibrationConfig(prior=bc.NormalGammaPrior(beta0=1.0))
    got = jax.jit(lambda t: calibrate_pytrees(t, cfg))(trees)
    core = bc.calibrate(
        [bc.GradientStats.from_samples(np.ones((1, 3), dtype=np.float32) * c) for c in (1.0, 2.0)],
        cfg,
    )
    np.testing.assert_allclose(np.asarray(got["p"]), core.gradient, rtol=1e-5)


def test_core_runs_unchanged_on_jax_arrays(x64: Any) -> None:
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=(7, 4, 3)) * s + 0.3 for s in (0.5, 1.0, 3.0)]
    for cfg in CONFIGS.values():
        cal = bc.calibrate([bc.GradientStats.from_samples(jnp.asarray(x)) for x in xs], cfg)
        want = bc.calibrate([bc.GradientStats.from_samples(x) for x in xs], cfg)
        assert isinstance(cal.gradient, jax.Array) and cal.gradient.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(cal.gradient), want.gradient, rtol=1e-10, atol=1e-12)
        assert cal.diagnostics["sources"] == want.diagnostics["sources"]
    a, b = (bc.GradientStats.from_samples(jnp.asarray(x)) for x in xs[:2])
    merged = a.merge(b)
    np.testing.assert_allclose(np.asarray(merged.m2), oracle.stats_of(np.concatenate(xs[:2]))[2])


def test_training_step_under_jit_reduces_loss() -> None:
    """Two-view logistic regression: per-example gradients by vmap(grad), BOGC update, jit."""
    rng = np.random.default_rng(10)
    n, d = 256, 5
    w_true = rng.normal(size=(2, d))
    xa, xb = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y = (xa @ w_true[0] + 0.3 * xb @ w_true[1] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    data = tuple(jnp.asarray(a, dtype=jnp.float32) for a in (xa, xb, y))

    def per_example(params: dict, xa: Any, xb: Any, y: Any) -> dict:
        za, zb = xa @ params["wa"], xb @ params["wb"]
        bce = lambda z: jnp.logaddexp(0.0, z) - y * z  # noqa: E731
        return {"fusion": bce(za + zb), "audio": bce(za), "video": bce(zb)}

    def source_loss(name: str) -> Any:
        return lambda p, xa, xb, y: per_example(p, xa, xb, y)[name]

    @jax.jit
    def step(params: dict, xa: Any, xb: Any, y: Any) -> dict:
        grads = {
            name: jax.vmap(jax.grad(source_loss(name)), in_axes=(None, 0, 0, 0))(params, xa, xb, y)
            for name in ("fusion", "audio", "video")
        }
        update = calibrate_pytrees(grads)
        return jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, params, update)

    def loss(params: dict) -> float:
        return float(jnp.mean(per_example(params, *data)["fusion"]))

    params = {"wa": jnp.zeros(d), "wb": jnp.zeros(d)}
    start = loss(params)
    for i in range(40):
        sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
        params = step(params, data[0][sl], data[1][sl], data[2][sl])
    assert loss(params) < 0.7 * start


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"config": bc.CalibrationConfig(prior_weight=1e39)}, r"prior_weight: 1e\+39 is outside"),
        ({"source_weights": [1e39, 1.0, 1.0]}, r"source_weights\[0\]: 1e\+39 exceeds"),
        ({"config": bc.CalibrationConfig(gamma=1e39)}, r"gamma: 1e\+39 exceeds"),
        ({"config": bc.CalibrationConfig(clip=100.0)}, r"clip: 100.0 is too large for float32"),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_options_beyond_the_dtype_are_refused_as_in_the_core(kw: Any, match: str, jit: bool) -> None:
    """The core's range checks (no NaN or inf answer): eager and under jit, with the
    core's own error on the same statistics; the input trees are left alone."""
    raw = _trees(np.random.default_rng(11))
    trees = _to_jax(raw, jnp.float32)
    run = jax.jit(lambda t: calibrate_pytrees(t, **kw)) if jit else (
        lambda t: calibrate_pytrees(t, **kw))
    with pytest.raises(bc.ConfigError, match=match):
        run(trees)
    stats = [bc.GradientStats.from_samples(np.asarray(trees[k]["b"])) for k in trees]
    with pytest.raises(bc.ConfigError, match=match):
        bc.calibrate(stats, kw.get("config"), kw.get("source_weights"))
    for got, want in zip(_leaves(trees), _leaves(_to_jax(raw, jnp.float32)), strict=True):
        np.testing.assert_array_equal(got, want)
    # just inside the float32 range: a finite answer equal to the core's
    ok = calibrate_pytrees(trees, source_weights=[1e30, 1.0, 1.0])
    core = bc.calibrate(stats, source_weights=[1e30, 1.0, 1.0]).gradient
    np.testing.assert_allclose(np.asarray(ok["b"]), core, rtol=1e-4)


def test_a_leaf_with_no_elements_gives_an_empty_update() -> None:
    """D = 0 is an empty answer in the core; the same here."""
    trees = [{"p": jnp.ones((4, 0)), "q": jnp.arange(8.0).reshape(4, 2) * c} for c in (1.0, 2.0)]
    got = calibrate_pytrees(trees)
    assert got["p"].shape == (0,)
    assert np.all(np.isfinite(np.asarray(got["q"])))
