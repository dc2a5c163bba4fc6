"""Lightning: BOGCCallback with manual optimisation and with the BOGCModule mixin.

Every test trains for two steps. The expected parameters come from a plain
PyTorch loop: with ``gamma = 0`` (equal evidence) from ``loss.backward()`` on
the plain sum of mean losses, otherwise from a standalone
``GradientCalibrator`` on the same batches.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from bogc_core.integrations.lightning import (  # noqa: E402
    BOGCCallback,
    BOGCModule,
    calibrated_backward,
)
from bogc_core.integrations.torch import GradientCalibrator, Microbatch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import bogc_core as bc  # noqa: E402

LR = 0.1
BATCH = 16


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
    y = ((xa[:, 0] + 0.3 * xb[:, 0]) > 0).long()
    return TensorDataset(xa, xb, y)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc_a = nn.Linear(6, 8)
        self.enc_b = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 2)

    def losses(self, xa: Any, xb: Any, y: Any) -> dict[str, Any]:
        ha, hb = torch.relu(self.enc_a(xa)), torch.relu(self.enc_b(xb))
        ce = nn.functional.cross_entropy
        return {
            "fusion": ce(self.head(ha + hb), y, reduction="none"),
            "audio": ce(self.head_a(ha), y, reduction="none"),
            "video": ce(self.head_b(hb), y, reduction="none"),
        }


class Manual(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = Net()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        calibrated_backward(self, self.net.losses(*batch))
        opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Auto(BOGCModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.bogc_loss(self.net.losses(*batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


def _fit(
    module: Any,
    callback: Any,
    steps: int = 2,
    n: int = 64,
    ckpt_path: Any = None,
    **trainer_kw: Any,
) -> Any:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if callback is None else [callback],
        **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and small loaders
        loader = DataLoader(_data(n), batch_size=BATCH, shuffle=False)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _reference(steps: int, config: bc.CalibrationConfig | None, plain: bool = False) -> Net:
    """The same training in a plain loop, with a standalone calibrator or loss.backward()."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    cal = GradientCalibrator(list(net.named_parameters()), config, samples=Microbatch(4))
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=False)
    for step, batch in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        losses = net.losses(*batch)
        if plain:
            sum(v.mean() for v in losses.values()).backward()
        else:
            cal.backward(losses)
        opt.step()
    return net


def _assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("module_cls", [Manual, Auto], ids=["manual", "automatic"])
def test_two_steps_equal_standalone_calibrator(module_cls: type) -> None:
    module = module_cls()
    cb = BOGCCallback(samples=Microbatch(chunks=4))
    trainer = _fit(module, cb)
    assert trainer.global_step == 2
    _assert_same(module.net, _reference(2, None))
    # The calibrated update is not the plain one (the test would not notice otherwise).
    plain = _reference(2, None, plain=True)
    diff = max(
        float((p - q).detach().abs().max())
        for p, q in zip(module.net.parameters(), plain.parameters(), strict=True)
    )
    assert diff > 1e-4
    diag = cb.last_diagnostics
    assert diag is not None and set(diag["sources"]) == {"fusion", "audio", "video"}
    logged = trainer.callback_metrics
    assert {"bogc/weight_mean/fusion", "bogc/fused_uncertainty_mean"} <= set(logged)
    total = sum(float(logged[f"bogc/weight_mean/{s}"]) for s in ("fusion", "audio", "video"))
    assert total > 0


@pytest.mark.parametrize("module_cls", [Manual, Auto], ids=["manual", "automatic"])
def test_equal_evidence_equals_plain_loss_backward(module_cls: type) -> None:
    # gamma = 0: e = 1 everywhere, so the update is the gradient of sum_k mean(loss_k).
    module = module_cls()
    _fit(module, BOGCCallback(config=bc.CalibrationConfig(gamma=0.0)))
    _assert_same(module.net, _reference(2, None, plain=True), tol=1e-5)


def test_checkpoint_carries_calibrator_state(tmp_path: Any) -> None:
    # samples="steps" carries statistics across steps, so resuming needs them back.
    # 32 examples in batches of 16: the checkpoint falls on an epoch boundary.
    kw = dict(samples="steps")
    whole = Manual()
    _fit(whole, BOGCCallback(**kw), steps=3, n=32)

    trainer = _fit(Manual(), BOGCCallback(**kw), steps=2, n=32)
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert any("calibrator" in v for v in state["callbacks"].values())

    resumed = Manual()
    trainer = _fit(resumed, BOGCCallback(**kw), steps=3, n=32, ckpt_path=ckpt)
    assert trainer.global_step == 3
    _assert_same(resumed.net, whole.net)

    # Without the carried statistics the third step differs (so the check above has teeth).
    for v in state["callbacks"].values():
        v.pop("calibrator", None)
    torch.save(state, tmp_path / "stateless.ckpt")
    amnesic = Manual()
    _fit(amnesic, BOGCCallback(**kw), steps=3, n=32, ckpt_path=tmp_path / "stateless.ckpt")
    diff = max(
        float((p - q).detach().abs().max())
        for p, q in zip(amnesic.net.parameters(), whole.net.parameters(), strict=True)
    )
    assert diff > 1e-6


def test_missing_callback_is_a_clear_error() -> None:
    with pytest.raises(bc.ConfigError, match="BOGCCallback"):
        _fit(Manual(), None, steps=1)


def test_gradient_accumulation_is_refused() -> None:
    with pytest.raises(bc.ConfigError, match="accumulate_grad_batches"):
        _fit(Auto(), BOGCCallback(), steps=1, accumulate_grad_batches=2)


def test_reserved_keywords_are_refused() -> None:
    with pytest.raises(bc.ConfigError, match="distributed"):
        BOGCCallback(distributed=object())
    with pytest.raises(bc.ConfigError, match="model: None"):
        BOGCCallback(model="yes")


@pytest.mark.parametrize("model", ["default", None], ids=["per-layer", "off"])
def test_per_layer_formulas_by_default_and_off_with_model_none(model: Any) -> None:
    # both ways give the reference calibrator's update (the formulas are exact); only the
    # path differs, which the diagnostics name
    module = Manual()
    kw = {} if model == "default" else {"model": None}
    cb = BOGCCallback(samples=Microbatch(chunks=4), **kw)
    _fit(module, cb)
    _assert_same(module.net, _reference(2, None))
    used = cb.last_diagnostics["shortcut_parameters"]
    assert (len(used) > 0) == (model == "default")


def test_params_selection_leaves_others_plain() -> None:
    # Only enc_a is calibrated; in manual mode nothing else writes the other grads,
    # so SGD leaves those parameters as they were.
    module = Manual()
    before = copy.deepcopy(module.net)
    cb = BOGCCallback(params=lambda m: list(m.net.enc_a.named_parameters()))
    _fit(module, cb, steps=1)
    assert not torch.equal(module.net.enc_a.weight, before.enc_a.weight)
    assert torch.equal(module.net.head.weight, before.head.weight)


class AutoCalledManually(L.LightningModule):
    """Automatic optimisation, yet calibrated_backward in training_step (the misuse)."""

    def __init__(self, returns_total: bool) -> None:
        super().__init__()
        self.net = Net()
        self.returns_total = returns_total

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        losses = self.net.losses(*batch)
        calibrated_backward(self, losses)
        return sum(v.mean() for v in losses.values()) if self.returns_total else None

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


@pytest.mark.parametrize("returns_total", [False, True])
def test_calibrated_backward_with_automatic_optimisation_is_refused(returns_total: bool) -> None:
    """Lightning would step on the plain total (or never step): refused before any
    p.grad, parameter or calibrator state changes, naming automatic_optimization."""
    module = AutoCalledManually(returns_total)
    before = copy.deepcopy(module.net)
    cb = BOGCCallback()
    with pytest.raises(bc.ConfigError, match=r"automatic_optimization = False"):
        _fit(module, cb, steps=1)
    for p, q in zip(module.net.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q) and p.grad is None
    assert cb.last_diagnostics is None
    assert cb.calibrator is not None and cb.calibrator.state_dict()["state"] is None
