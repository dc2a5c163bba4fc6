"""Per-layer statistics for sequence models, against brute-force per-example autograd.

Each formula of ``layer_grads`` (Linear on inputs of any rank, Embedding with
a padding row and repeated indices, LayerNorm) is compared with per-example
gradients computed one example at a time by autograd; then a small attention
model with padding masks goes through the calibrator (``per_example`` and
``microbatch``), every parameter on the per-layer path, against the
reference calibration of looped per-example gradients. Gradient checkpointing:
non-reentrant with dropout gives the statistics of the forward's own masks;
reentrant is refused before any ``p.grad`` changes.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from bogc_core.integrations.torch import Diagnostics, GradientCalibrator  # noqa: E402
from bogc_core.integrations.torch import per_example as pe_mod  # noqa: E402
from bogc_core.integrations.torch.layer_grads import (  # noqa: E402
    embedding_slice_moments,
    example_sums,
    slice_sums,
)
from bogc_core.integrations.torch.memory import default_chunk_bytes, free_bytes  # noqa: E402
from bogc_core.integrations.torch.shortcut import Tap  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torchtools import chunk_means, reference, source, stats_reference  # noqa: E402

from bogc_core import BOGCError, CalibrationConfig, GradientStats  # noqa: E402

D64 = torch.float64


def _brute(mod: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients ``(N, *shape)`` of ``<delta_i, mod(x_i)>``, one example at a time."""
    names = [n for n, _ in mod.named_parameters()]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(x.shape[0]):
        out = mod(x[i:i + 1])
        gs = torch.autograd.grad(out, list(mod.parameters()), grad_outputs=delta[i:i + 1])
        for n, g in zip(names, gs):
            rows[n].append(g)
    return {n: torch.stack(v) for n, v in rows.items()}


def _tap(mod: nn.Module, x: torch.Tensor) -> Tap:
    out = mod(x)
    has_bias = isinstance(getattr(mod, "bias", None), torch.Tensor)
    return Tap(mod, x.detach(), out, out._version, 0, 1 if has_bias else None)


def _cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    emb = nn.Embedding(7, 5, padding_idx=0).double()
    return [
        ("linear_2d", nn.Linear(4, 3).double(), torch.randn(6, 4, generator=g, dtype=D64)),
        ("linear_3d", nn.Linear(4, 3).double(), torch.randn(6, 5, 4, generator=g, dtype=D64)),
        ("linear_4d", nn.Linear(4, 3, bias=False).double(),
         torch.randn(5, 2, 3, 4, generator=g, dtype=D64)),
        # Indices repeat within an example and include the padding row 0.
        ("embedding_2d", emb, torch.randint(0, 7, (6, 9), generator=g)),
        ("embedding_3d", nn.Embedding(6, 3).double(), torch.randint(0, 6, (5, 2, 4), generator=g)),
        ("layernorm_3d", nn.LayerNorm(4).double(), 3 * torch.randn(6, 5, 4, generator=g, dtype=D64)),
        ("layernorm_2axes", nn.LayerNorm((3, 4)).double(),
         torch.randn(5, 2, 3, 4, generator=g, dtype=D64) + 1.0),
    ]


@pytest.mark.parametrize("square_bytes", [1, 200, 1 << 18])
def test_linear_squares_in_example_blocks_and_into_given_tensors(monkeypatch, square_bytes):
    """A Linear layer on (N, in) inputs squares its rows a few examples at a time (one, three
    or all of them here) and writes both sums into the tensors ``into`` gives: the sums of
    per-example autograd either way, and the given tensors are the ones returned."""
    from bogc_core.integrations.torch import layer_grads

    monkeypatch.setattr(layer_grads, "SQUARE_BYTES", square_bytes)
    g = torch.Generator().manual_seed(4)
    mod = nn.Linear(4, 3).double()
    x = torch.randn(7, 4, generator=g, dtype=D64)
    tap = _tap(mod, x)
    delta = torch.randn(tap.out.shape, generator=g, dtype=D64)
    per = _brute(mod, x, delta)
    dst = (torch.full((3, 4), math.nan, dtype=D64), torch.full((3, 4), math.nan, dtype=D64))
    for into in (None, lambda idx: dst if idx == 0 else None):
        sums = example_sums(tap, D64, delta, 1 << 20, into)
        tot, sq = sums[0]
        torch.testing.assert_close(tot, per["weight"].sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sq, (per["weight"] ** 2).sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums[1][1], (per["bias"] ** 2).sum(0), rtol=1e-12, atol=1e-12)
        if into is not None:
            assert tot.data_ptr() == dst[0].data_ptr() and sq.data_ptr() == dst[1].data_ptr()
    # a destination of another dtype is not written: new tensors come back
    wrong = (torch.zeros(3, 4), torch.zeros(3, 4))
    tot, _ = example_sums(tap, D64, delta, 1 << 20, lambda idx: wrong)[0]
    assert tot.dtype == D64 and tot.data_ptr() != wrong[0].data_ptr() and not wrong[0].any()


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_layer_sums_match_per_example_autograd(case):
    _, mod, x = case
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a non-trivial LayerNorm affine
    tap = _tap(mod, x)
    delta = torch.randn(tap.out.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    per = _brute(mod, x, delta)
    # chunk_bytes below one example's gradient: the blocked squares run one example at a time.
    for chunk in (1, 1 << 20):
        sums = example_sums(tap, D64, delta, chunk)
        for idx, name in ((0, "weight"), (1, "bias")):
            if name not in per:
                assert idx not in sums
                continue
            tot, sq = sums[idx]
            torch.testing.assert_close(tot, per[name].sum(0), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sq, (per[name] ** 2).sum(0), rtol=1e-10, atol=1e-12)
    slices = [slice(0, 2), slice(2, 3), slice(3, x.shape[0])]
    rows = slice_sums(tap, D64, delta, slices)
    for idx, name in ((0, "weight"), (1, "bias")):
        if name in per:
            expect = torch.stack([per[name][s].sum(0) for s in slices])
            torch.testing.assert_close(rows[idx], expect, rtol=1e-10, atol=1e-12)
    if isinstance(mod, nn.Embedding):
        f = [0.5, 1.5, 1.0]
        W, mean, m2 = embedding_slice_moments(tap, D64, delta, slices, f)
        gj = torch.stack([per["weight"][s].mean(0) for s in slices])
        fw = torch.tensor(f, dtype=D64)[:, None, None]
        m = (fw * gj).sum(0) / sum(f)
        assert W == sum(f)
        torch.testing.assert_close(mean, m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m2, (fw * (gj - m) ** 2).sum(0), rtol=1e-9, atol=1e-12)


def test_padding_row_gets_no_gradient():
    emb = nn.Embedding(5, 3, padding_idx=2).double()
    x = torch.tensor([[2, 2, 1], [2, 4, 4]])
    tap = _tap(emb, x)
    delta = torch.ones(tap.out.shape, dtype=D64)
    tot, sq = example_sums(tap, D64, delta, 1 << 20)[0]
    assert bool((tot[2] == 0).all()) and bool((sq[2] == 0).all())
    torch.testing.assert_close(sq[4], torch.full((3,), 4.0, dtype=D64))  # one example, twice


# ------------------------------------------------------- a small attention model


class TinyEncoder(nn.Module):
    """Token + broadcast position embeddings, LayerNorm, one attention block with a
    padding mask, a feed-forward layer, masked mean pooling; a text head, a tabular
    encoder and head, and a fusion head (sources ``fusion``, ``text``, ``tab``)."""

    def __init__(self, vocab: int = 11, width: int = 8, p_drop: float = 0.0,
                 checkpointing: str = "none") -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width, padding_idx=0)
        self.pos = nn.Embedding(16, width)
        self.ln0 = nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.ln1 = nn.LayerNorm(width)
        self.ff = nn.Linear(width, 2 * width)
        self.ff2 = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(p_drop)
        self.tab = nn.Linear(3, 4)
        self.text_head, self.tab_head = nn.Linear(width, 3), nn.Linear(4, 3)
        self.fusion = nn.Linear(width + 4, 3)
        self.checkpointing = checkpointing

    def block(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = q @ k.transpose(1, 2) / h.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask[:, None, :], -1e9)
        a = self.o(self.drop(torch.softmax(scores, -1)) @ v)
        h = self.ln1(h + a)
        return h + self.ff2(self.drop(torch.tanh(self.ff(h))))

    def forward(self, ids: torch.Tensor, tab: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = ids != 0
        pos = torch.arange(ids.shape[1])[None]          # (1, T): broadcast over the batch
        h = self.ln0(self.tok(ids) + self.pos(pos))
        if self.checkpointing == "none":
            h = self.block(h, mask)
        else:
            h = checkpoint(self.block, h, mask, use_reentrant=self.checkpointing == "reentrant")
        m = mask[..., None].to(h.dtype)
        z = (h * m).sum(1) / m.sum(1)
        zt = torch.tanh(self.tab(tab))
        return {"fusion": F.cross_entropy(self.fusion(torch.cat([z, zt], -1)), y, reduction="none"),
                "text": F.cross_entropy(self.text_head(z), y, reduction="none"),
                "tab": F.cross_entropy(self.tab_head(zt), y, reduction="none")}


def _data(n: int = 9, T: int = 6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    ids[torch.arange(T)[None] >= lengths[:, None]] = 0         # right padding
    return ids, torch.randn(n, 3, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(model: nn.Module, ids, tab, y) -> dict[str, dict[str, torch.Tensor]]:
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, dict[str, list[torch.Tensor]]] = {}
    for i in range(ids.shape[0]):
        ls = model(ids[i:i + 1], tab[i:i + 1], y[i:i + 1])
        for s, l in ls.items():
            gs = torch.autograd.grad(l[0], list(model.parameters()), allow_unused=True,
                                     retain_graph=True)
            for n, g in zip(names, gs):
                if g is not None:
                    out.setdefault(s, {}).setdefault(n, []).append(g)
    return {s: {n: torch.stack(v) for n, v in d.items()} for s, d in out.items()}


@pytest.mark.parametrize("samples", ["per_example", "microbatch", "microbatch_sparse_embeddings"])
def test_attention_model_every_parameter_on_the_layer_path(samples, monkeypatch):
    """Every parameter on the per-layer path equals the looped per-example reference; with
    micro-batches, small embedding tables are summed densely, and (``DENSE_EMBEDDING = 0``)
    from the touched rows alone."""
    if samples == "microbatch_sparse_embeddings":
        from bogc_core.integrations.torch import microbatch as mb_mod

        monkeypatch.setattr(mb_mod, "DENSE_EMBEDDING", 0)
        samples = "microbatch"
    torch.manual_seed(0)
    model = TinyEncoder().double()
    ids, tab, y = _data()
    cal = GradientCalibrator(model.named_parameters(), CalibrationConfig(gamma=0.5),
                             samples=source(samples, chunks=3), model=model)
    diag = cal.backward(model(ids, tab, y))
    assert sorted(diag["shortcut_parameters"]) == sorted(n for n, _ in model.named_parameters())
    G = _loop_grads(model, ids, tab, y)
    if samples == "per_example":
        ref = reference(G, CalibrationConfig(gamma=0.5))
    else:  # 9 examples in 3 equal chunks: unweighted chunk means
        per_param: dict[str, dict[str, GradientStats]] = {}
        for s, d in G.items():
            for n, x in d.items():
                per_param.setdefault(n, {})[s] = GradientStats.from_samples(chunk_means(x, 3))
        ref = stats_reference(per_param, CalibrationConfig(gamma=0.5))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-12, msg=n)


def test_attention_model_without_model_matches_the_layer_path():
    # The generic path (exact per-example rows from autograd) is an independent check of
    # the whole pipeline, broadcast position embedding included.
    torch.manual_seed(0)
    a, b = TinyEncoder().double(), TinyEncoder().double()
    b.load_state_dict(a.state_dict())
    ids, tab, y = _data()
    GradientCalibrator(a.named_parameters(), samples="per_example", model=a).backward(a(ids, tab, y))
    GradientCalibrator(b.named_parameters(), samples="per_example").backward(b(ids, tab, y))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=n)


@pytest.mark.parametrize("samples", ["per_example", "microbatch"])
@pytest.mark.parametrize("use_model", [True, False], ids=["layer_path", "generic"])
def test_non_reentrant_checkpointing_with_dropout_uses_the_forward_masks(samples, use_model):
    # Same seed, same forward: the masks of a checkpointed and a plain model are equal, so
    # the plain model's looped per-example gradients are the reference for both statistics.
    torch.manual_seed(0)
    ck = TinyEncoder(p_drop=0.3, checkpointing="non-reentrant").double()
    plain = TinyEncoder(p_drop=0.3).double()
    plain.load_state_dict(ck.state_dict())
    ids, tab, y = _data()
    cal = GradientCalibrator(ck.named_parameters(), samples=source(samples, chunks=3),
                             model=ck if use_model else None,
                             diagnostics=Diagnostics(keep_statistics=True))
    torch.manual_seed(7)
    cal.backward(ck(ids, tab, y))
    torch.manual_seed(7)
    ls = plain(ids, tab, y)
    names = [n for n, _ in plain.named_parameters()]
    for s, l in ls.items():
        rows: dict[str, list[torch.Tensor]] = {}
        for i in range(ids.shape[0]):
            gs = torch.autograd.grad(l[i], list(plain.parameters()), allow_unused=True,
                                     retain_graph=True)
            for n, g in zip(names, gs):
                if g is not None:
                    rows.setdefault(n, []).append(g)
        for n, v in rows.items():
            x = torch.stack(v)
            if samples == "microbatch":
                x = chunk_means(x, 3)
            ref = GradientStats.from_samples(x)
            st = cal.last_statistics[s][n]
            torch.testing.assert_close(st.mean, ref.mean, rtol=1e-8, atol=1e-12, msg=f"{s} {n}")
            torch.testing.assert_close(st.m2, ref.m2, rtol=1e-7, atol=1e-12, msg=f"{s} {n}")
    for n, p in ck.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), n


def test_reentrant_checkpointing_is_refused_before_any_gradient_changes():
    torch.manual_seed(0)
    model = TinyEncoder(checkpointing="reentrant").double()
    ids, tab, y = _data()
    cal = GradientCalibrator(model.named_parameters(), samples="microbatch", model=model)
    with pytest.raises(BOGCError, match="use_reentrant"):
        cal.backward(model(ids, tab, y))
    assert all(p.grad is None for p in model.parameters())


def test_a_reached_parameter_without_statistics_is_an_error(monkeypatch):
    torch.manual_seed(0)
    model = TinyEncoder().double()
    ids, tab, y = _data()
    cal = GradientCalibrator(model.named_parameters(), samples="per_example", model=model)
    real = pe_mod.per_example

    def drops_one(prob, *a, **k):  # a sample source that forgets the text head's bias
        out = real(prob, *a, **k)
        names = [n for n, _ in model.named_parameters()]
        out["text"].pop(names.index("text_head.bias"))
        return out

    monkeypatch.setattr(pe_mod, "per_example", drops_one)
    with pytest.raises(BOGCError, match="text_head.bias"):
        cal.backward(model(ids, tab, y))
    assert all(p.grad is None for p in model.parameters())


def test_default_chunk_bytes_follows_the_model():
    small = [torch.zeros(10, requires_grad=True)]
    big = [torch.zeros(10_000_000, requires_grad=True)]  # 40 MB in float32
    assert default_chunk_bytes(small) == 1 << 26          # the floor
    free = free_bytes(torch.device("cpu"))
    if free is not None and free // 8 < 16 * 40_000_000:
        pytest.skip("less than 5 GB free: the bound is the free memory, not the model")
    assert default_chunk_bytes(big) == 16 * 40_000_000    # 16 rows of the whole model


@pytest.mark.parametrize("chunk_bytes", [None, 1 << 12])
def test_the_sample_source_gets_its_chunk_bytes_or_the_model_default(chunk_bytes, monkeypatch):
    from bogc_core.integrations.torch import Microbatch
    from bogc_core.integrations.torch import microbatch as mb_mod

    torch.manual_seed(0)
    model = TinyEncoder().double()
    ids, tab, y = _data()
    src = Microbatch(chunks=3, chunk_bytes=chunk_bytes)
    cal = GradientCalibrator(model.named_parameters(), samples=src, model=model)
    want = default_chunk_bytes(model.parameters()) if chunk_bytes is None else chunk_bytes
    assert cal.chunk_bytes == want and src.chunk_bytes == chunk_bytes  # the source is not changed
    seen = []
    real = mb_mod.microbatch

    def spy(prob, chunks, bound, sink=None):
        seen.append(bound)
        return real(prob, chunks, bound, sink)

    monkeypatch.setattr(mb_mod, "microbatch", spy)
    cal.backward(model(ids, tab, y))
    assert seen == [want]
