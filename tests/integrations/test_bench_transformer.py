"""``bogc bench --model transformer``: shared trunk, masking, the calibrator's paths, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bogc_core.integrations.bench import main
from bogc_core.integrations.bench.methods.mmpareto import mmpareto, mmpareto_many
from bogc_core.integrations.bench.model import ALIGN, FUSION
from bogc_core.integrations.bench.models import build_model
from bogc_core.integrations.bench.transformer import TOKENS, WIDTH, FusionTransformer
from bogc_core.integrations.bench.zeroshot import info_nce
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator, Microbatch, PerExample

from bogc_core.errors import ConfigError

DIMS = {"a": 6, "b": 1, "c": 4}


def _net(seed=0, embed_dim=None):
    torch.manual_seed(seed)
    return FusionTransformer(DIMS, 3, embed_dim)


def _inputs(seed=1, B=10):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, d, generator=g) for d in DIMS.values()]
    return xs, torch.randint(0, 3, (B,), generator=g)


def _losses(model, xs, y):
    z, zs = model(xs)
    losses = {FUSION: F.cross_entropy(z, y, reduction="none")}
    for m, u in zip(model.modalities, zs):
        losses[m] = F.cross_entropy(u, y, reduction="none")
    if ALIGN in model.sources:
        losses[ALIGN] = info_nce(model.last_embeddings)
    return losses


@pytest.mark.parametrize("embed_dim", [None, 8])
def test_every_trunk_parameter_is_reached_by_every_source(embed_dim):
    model = _net(embed_dim=embed_dim)
    model.eval()  # no dropout: a dropped unit cannot zero a gradient by chance
    xs, y = _inputs()
    losses = _losses(model, xs, y)
    groups = model.param_groups()
    params = list(model.parameters())
    assert sorted(id(p) for g, _ in groups for p in g) == sorted(id(p) for p in params)
    trunk, srcs = groups[0]
    assert set(srcs) == set(losses) and len(trunk) == len(model.encoder_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for s, loss in losses.items():
        grads = torch.autograd.grad(loss.mean(), trunk, retain_graph=True, allow_unused=True)
        for p, g in zip(trunk, grads):
            assert g is not None and bool(g.abs().sum() > 0), (s, names[id(p)])
    # the other groups: exactly the sources they name
    for group, gs in groups[1:]:
        for s, loss in losses.items():
            grads = torch.autograd.grad(loss.mean(), group, retain_graph=True, allow_unused=True)
            assert any(g is not None and bool(g.abs().sum() > 0) for g in grads) == (s in gs)


def test_a_dropped_modality_is_masked_out_of_attention():
    model = _net()
    model.eval()
    xs, _ = _inputs()
    changed = [x.clone() for x in xs]
    changed[1] = changed[1] + 5.0
    with torch.no_grad():
        z, zs = model(xs, drop=(1,))
        z2, zs2 = model(changed, drop=(1,))
        z3, zs3 = model(changed)
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-6)
    for i in (0, 2):
        torch.testing.assert_close(zs2[i], zs[i], rtol=0, atol=1e-6)
    # without the mask the change reaches the fusion logits and the other heads
    assert not torch.allclose(z3, z, atol=1e-4) and not torch.allclose(zs3[0], zs[0], atol=1e-4)


def test_mean_impute_replaces_the_tokens_and_the_mask_equals_a_shorter_sequence():
    model = _net()
    model.eval()
    xs, _ = _inputs()
    with torch.no_grad():
        model(xs)
        means = [t.mean(0) for t in model.last_features]
        assert means[0].shape == (TOKENS, WIDTH)
        cls, toks = model.tokens(xs)
        # the modality embedding is row m of one table, added to every token of modality m
        torch.testing.assert_close(toks[2] - model.encoders[2](xs[2]),
                                   model.modality.weight[2].expand(10, TOKENS, WIDTH))
        z_fill, _ = model(xs, drop=(1,), fill=means)
        seq = torch.cat([cls, toks[0], means[1].expand(10, -1, -1), toks[2]], 1)
        torch.testing.assert_close(z_fill, model.fusion_head(model.trunk(seq)[:, 0]))
        # masking modality 1 equals leaving its tokens out of the sequence
        z_mask, _ = model(xs, drop=(1,))
        short = torch.cat([cls, toks[0], toks[2]], 1)
        torch.testing.assert_close(z_mask, model.fusion_head(model.trunk(short)[:, 0]),
                                   rtol=1e-5, atol=1e-5)


def test_block_equals_torch_encoder_layer_with_the_same_weights():
    """The hand-written block is PyTorch's pre-norm ``TransformerEncoderLayer`` (ReLU, 4
    heads), its attention projections as ``nn.Linear`` layers; with a key mask too."""
    from bogc_core.integrations.bench.transformer import FFN, HEADS, Block

    torch.manual_seed(3)
    block = Block().eval()
    ref = torch.nn.TransformerEncoderLayer(WIDTH, HEADS, FFN, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.out.weight)
        ref.self_attn.out_proj.bias.copy_(block.out.bias)
        for a, b in ((ref.linear1, block.ff1), (ref.linear2, block.ff2), (ref.norm1, block.norm1),
                     (ref.norm2, block.norm2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        h = torch.randn(5, 7, WIDTH)
        torch.testing.assert_close(block(h), ref(h), rtol=1e-5, atol=1e-5)
        pad = torch.zeros(5, 7, dtype=torch.bool)
        pad[:, 4:] = True
        torch.testing.assert_close(block(h, ~pad[:, None, None, :]),
                                   ref(h, src_key_padding_mask=pad), rtol=1e-5, atol=1e-5)


def test_zeroshot_embeddings_see_their_own_modality_only():
    model = _net(embed_dim=8)
    model.eval()
    xs, _ = _inputs()
    with torch.no_grad():
        model(xs)
        e = [t.clone() for t in model.last_embeddings]
        model([xs[0], xs[1] + 3.0, xs[2]])
    torch.testing.assert_close(model.last_embeddings[0], e[0])
    torch.testing.assert_close(model.last_embeddings[2], e[2])
    assert not torch.allclose(model.last_embeddings[1], e[1])


@pytest.mark.parametrize("samples", ["microbatch", "per_example"])
def test_calibrator_statistics_on_attention_and_layernorm_are_exact(samples):
    """The calibrator's per-source mean equals autograd's gradient of the mean loss for every
    parameter, and every parameter takes a per-layer formula: Linear on 2-D and 3-D inputs
    (tokenizers, attention projections, feed-forward, heads), LayerNorm and Embedding (the
    CLS token and the modality embeddings)."""
    model = _net()
    model.eval()
    xs, y = _inputs(B=8)
    named = list(model.named_parameters())
    source = Microbatch(chunks=4) if samples == "microbatch" else PerExample()
    cal = GradientCalibrator(named, samples=source, model=model,
                             diagnostics=Diagnostics(keep_statistics=True))
    losses = _losses(model, xs, y)
    want = {s: torch.autograd.grad(loss.mean(), [p for _, p in named], retain_graph=True,
                                   allow_unused=True)
            for s, loss in losses.items()}
    diag = cal.backward(losses)
    assert set(diag["shortcut_parameters"]) == {n for n, _ in named}
    assert {"cls.weight", "modality.weight", "trunk.blocks.0.qkv.weight",
            "trunk.norm.bias"} <= {n for n, _ in named}
    for s in losses:
        for (n, _), g in zip(named, want[s]):
            st = cal.last_statistics[s].get(n)
            if st is None:  # the source does not reach this tensor
                assert g is None or not bool(g.abs().sum() > 0), (s, n)
                continue
            torch.testing.assert_close(st.mean, g, rtol=1e-4, atol=1e-6)


def test_mmpareto_many_reduces_to_the_two_source_rule_and_is_uniform_without_conflict():
    g = torch.Generator().manual_seed(0)
    gm = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    gu = [-t + 0.1 * torch.randn(t.shape, generator=g) for t in gm]  # conflicting
    want, a = mmpareto(gm, gu)
    got, w = mmpareto_many([gm, gu])
    assert w[0] == pytest.approx(a, abs=1e-6)
    for x, y_ in zip(got, want):
        torch.testing.assert_close(x, y_)
    # three agreeing sources: a = 1/3, h = sum g_k, r = 1, update 1.5 sum g_k
    base = [torch.ones(3, 2), torch.ones(4)]
    three = [[t * c for t in base] for c in (1.0, 2.0, 0.5)]
    got, w = mmpareto_many(three)
    assert w == pytest.approx([1 / 3] * 3)
    for x, b in zip(got, base):
        torch.testing.assert_close(x, 1.5 * 3.5 * b)


def test_build_model_refuses_an_unknown_name():
    with pytest.raises(ConfigError, match="model"):
        build_model("cnn", DIMS, 3)


def _toy(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(5), 16)
    path = tmp_path / "toy.npz"
    np.savez(path, y=y, x_a=rng.normal(size=(5, 4))[y] + rng.normal(size=(y.size, 4)),
             x_b=rng.normal(size=(y.size, 2, 2)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["missing", "zeroshot"])
def test_cli_transformer_run_records_the_model(tmp_path, setting):
    out = tmp_path / "o"
    rc = main(["--dataset", str(_toy(tmp_path)), "--model", "transformer", "--setting", setting,
               "--methods", "sum,bogc,pcgrad,mmpareto,ogm_ge", "--seeds", "2", "--tune-seeds", "1",
               "--epochs", "1", "--max-epochs", "1", "--no-progress", "--jobs", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["train_config"]["model"] == "transformer" and doc["setting"] == setting
    if setting == "zeroshot":
        assert len(doc["split"]["unseen_classes"]) == 3
    else:
        assert set(doc["methods"]["bogc"]["missing_rules"]["zero_fill"]) == {"a", "b"}


def test_help_lists_zeroshot_and_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "zeroshot" in out and "--model {mlp,transformer}" in out
