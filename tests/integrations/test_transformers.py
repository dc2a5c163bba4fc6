"""``BOGCTrainer``: the Hugging Face Trainer with BOGC's calibrated backward pass.

The tiny model and data of ``examples/train_transformers.py`` (a
``PreTrainedModel`` with its own config) train for a few steps on CPU in
float64. The gradient the Trainer hands to its optimizer is compared with an
independent computation on a copy of the model taken at the start of the step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scripttools import load_script

torch = pytest.importorskip("torch", reason="needs the torch extra")
pytest.importorskip("transformers", reason="needs the optional transformers extra")
from bogc_core.integrations.torch import GradientCalibrator, Microbatch  # noqa: E402
from bogc_core.integrations.transformers import BOGCTrainer, source_losses  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from bogc_core import CalibrationConfig, ConfigError  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_transformers.py"


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    return load_script(SCRIPT)


class Recorder(TrainerCallback):
    """Parameters at each step's start and the gradients the optimizer is given."""

    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []
        self.grads: list[dict[str, Any]] = []
        self.model: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                      **kwargs: Any) -> None:
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = self.model
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def _setup(ex: ModuleType, tmp_path: Path, n: int = 48) -> tuple[Any, Any]:
    torch.manual_seed(0)
    data = ex.TwoViewData(n, seed=0)
    data.x_a, data.x_b = data.x_a.double(), data.x_b.double()
    model = ex.TinyFusionModel(ex.TinyFusionConfig()).double()
    return data, model


def _train(trainer_cls: type, ex: ModuleType, tmp_path: Path, steps: int, batch: int,
           **kw: Any) -> tuple[Any, Any, Recorder]:
    data, model = _setup(ex, tmp_path)
    rec = Recorder()
    rec.model = model
    trainer = trainer_cls(model=model, args=ex.training_args(str(tmp_path), steps, batch=batch),
                          train_dataset=data, callbacks=[rec], **kw)
    trainer.train()
    return trainer, data, rec


def _copy_at(ex: ModuleType, params: dict[str, Any]) -> Any:
    model = ex.TinyFusionModel(ex.TinyFusionConfig()).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model


def _full_batch_losses(model: Any, data: Any) -> dict[str, Any]:
    return model(x_a=data.x_a, x_b=data.x_b, labels=data.y)["losses"]


def test_the_optimizer_gets_the_calibrators_gradient(ex: ModuleType, tmp_path: Path) -> None:
    # One batch = the whole data set; per-example statistics do not depend on the row order.
    trainer, data, rec = _train(BOGCTrainer, ex, tmp_path, steps=2, batch=48,
                                samples="per_example")
    assert len(rec.grads) == 2 and trainer.last_diagnostics
    for step in range(2):
        copy_ = _copy_at(ex, rec.params[step])
        ref = GradientCalibrator(copy_.named_parameters(), CalibrationConfig(),
                                 samples="per_example")
        ref.backward(_full_batch_losses(copy_, data))
        for n, p in copy_.named_parameters():
            torch.testing.assert_close(rec.grads[step][n], p.grad, rtol=1e-9, atol=1e-12)
    # the calibrated gradient is not the plain sum (the calibration acts)
    copy_ = _copy_at(ex, rec.params[0])
    sum(v.mean() for v in _full_batch_losses(copy_, data).values()).backward()
    gap = max(float((rec.grads[0][n] - p.grad).abs().max()) for n, p in copy_.named_parameters())
    assert gap > 1e-4


def test_equal_evidence_gives_the_plain_sums_gradient(ex: ModuleType, tmp_path: Path) -> None:
    # gamma = 0 maps every precision to evidence 1: g_hat is sum_k grad mean(loss_k)
    # (docs/method.md, Stage 5), computed here by autograd on a copy of the model.
    _, data, rec = _train(BOGCTrainer, ex, tmp_path, steps=2, batch=48,
                          bogc_config=CalibrationConfig(gamma=0.0), samples="microbatch")
    for step in range(2):
        copy_ = _copy_at(ex, rec.params[step])
        sum(v.mean() for v in _full_batch_losses(copy_, data).values()).backward()
        for n, p in copy_.named_parameters():
            torch.testing.assert_close(rec.grads[step][n], p.grad, rtol=1e-9, atol=1e-12)


def test_equal_evidence_follows_the_plain_trainer(ex: ModuleType, tmp_path: Path) -> None:
    # Same seed, same batches: BOGC with equal evidence and the plain Trainer on the
    # summed loss take the same steps, mini-batches of 16 in a shuffled order.
    bogc, _, _ = _train(BOGCTrainer, ex, tmp_path / "b", steps=3, batch=16,
                        bogc_config=CalibrationConfig(gamma=0.0))
    plain, _, _ = _train(Trainer, ex, tmp_path / "p", steps=3, batch=16)
    for (_, p), (_, q) in zip(bogc.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    moved = [float((p - q).detach().abs().max()) for (_, p), (_, q) in
             zip(bogc.model.named_parameters(), _setup(ex, tmp_path)[1].named_parameters())]
    assert max(moved) > 1e-3


def test_bogc_training_decreases_the_loss(ex: ModuleType, tmp_path: Path) -> None:
    data, model = _setup(ex, tmp_path)
    start = copy.deepcopy(model)
    trainer = BOGCTrainer(model=model, args=ex.training_args(str(tmp_path), 8, batch=16),
                          train_dataset=data)
    trainer.train()

    def plain_loss(m: Any) -> float:
        with torch.no_grad():
            return float(sum(v.mean() for v in _full_batch_losses(m, data).values()))

    assert plain_loss(model) < 0.9 * plain_loss(start)
    assert trainer.calibrator is not None
    # evaluation reports the plain sum of the sources' mean losses (one batch: all rows)
    trainer.args.per_device_eval_batch_size = 48
    metrics = trainer.evaluate(data)
    assert metrics["eval_loss"] == pytest.approx(plain_loss(model), rel=1e-9)
    assert set(trainer.calibrator.param_names) == {n for n, _ in model.named_parameters()}


def test_outputs_without_losses_are_refused(ex: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"outputs\['per_source'\]"):
        source_losses({"loss": torch.zeros(())}, "per_source")
    with pytest.raises(ConfigError, match="non-empty mapping"):
        source_losses({"losses": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"\['a'\]: must be a torch.Tensor"):
        source_losses({"losses": {"a": [1.0]}})
    data, model = _setup(ex, tmp_path)
    trainer = BOGCTrainer(model=model, args=ex.training_args(str(tmp_path), 1, batch=16),
                          train_dataset=data, losses_key="nope")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="losses_key"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_gradient_accumulation_and_several_processes_are_refused(
    ex: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model = _setup(ex, tmp_path)
    args = ex.training_args(str(tmp_path), 2, batch=16)
    args.gradient_accumulation_steps = 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        BOGCTrainer(model=model, args=args, train_dataset=data)
    with pytest.raises(ConfigError, match="bogc_config"):
        BOGCTrainer(model=model, args=ex.training_args(str(tmp_path), 2), train_dataset=data,
                    bogc_config={"gamma": 0.5})
    args = ex.training_args(str(tmp_path), 2)
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(ConfigError, match="world_size"):
        BOGCTrainer(model=model, args=args, train_dataset=data)


def test_example_script_runs(ex: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    ex.main(["--steps", "12"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("bogc: training loss")
    assert float(line.rsplit(" ", 1)[1]) > 0.6  # 3 classes: chance is 1/3


def _args(ex: ModuleType, out: Path, steps: int, **kw: Any) -> Any:
    args = ex.training_args(str(out), steps, batch=16)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_diagnostics_reach_the_log_history_with_default_options(ex: ModuleType,
                                                                tmp_path: Path) -> None:
    data, model = _setup(ex, tmp_path)
    args = _args(ex, tmp_path, 6, logging_strategy="steps", logging_steps=3)
    trainer = BOGCTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert {f"bogc/weight_mean/{s}" for s in ("fusion", "a", "b")} <= set(r)
        assert all(isinstance(v, float) for k, v in r.items() if k.startswith("bogc/"))
        assert r["bogc/num_calibrated"] > 0 and 0.0 < r["bogc/weight_mean/b"] < 1.0
    # The logged weights are those of the step logged: recompute step 6's diagnostics.
    assert trainer.last_diagnostics["sampled"]
    assert rows[-1]["bogc/weight_mean/fusion"] == trainer.last_diagnostics["weight_mean"]["fusion"]


@pytest.mark.parametrize("rho", [None, 0.8])
def test_checkpoints_hold_the_calibrator_and_resume_is_exact(ex: ModuleType, tmp_path: Path,
                                                              rho: float | None) -> None:
    kw = {} if rho is None else {"samples": Microbatch(rho=rho)}

    def run(out: Path, resume: str | None = None) -> Any:
        data, model = _setup(ex, tmp_path)
        args = _args(ex, out, 4, save_strategy="steps", save_steps=2)
        trainer = BOGCTrainer(model=model, args=args, train_dataset=data,
                              bogc_config=CalibrationConfig(gamma=0.5), **kw)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = torch.load(ckpt / "bogc_calibrator.pt", weights_only=True)
    assert saved["params"] == full.calibrator.param_names
    assert (saved["state"] is None) == (rho is None)
    resumed = run(tmp_path / "resumed", resume=str(ckpt))
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        # Equal up to float64 rounding (matrix products may round differently with the
        # memory layout of a fresh process's buffers).
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=n)
    if rho is not None:
        # Without the calibrator's state the carried statistics restart: the run differs.
        (ckpt / "bogc_calibrator.pt").unlink()
        fresh = run(tmp_path / "fresh", resume=str(ckpt))
        gap = max(float((p - q).abs().max()) for p, q in
                  zip(full.model.parameters(), fresh.model.parameters()))
        assert gap > 1e-9


def test_losses_stay_out_of_predictions(ex: ModuleType, tmp_path: Path) -> None:
    data, model = _setup(ex, tmp_path)
    seen = {}

    def metrics(pred: Any) -> dict[str, float]:
        seen["predictions"] = pred.predictions
        return {"acc": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = BOGCTrainer(model=model, args=_args(ex, tmp_path, 1), train_dataset=data,
                          compute_metrics=metrics)
    out = trainer.evaluate(data)
    assert "eval_acc" in out
    assert seen["predictions"].shape == (len(data), 3)  # the logits alone, no losses dict


def test_reentrant_checkpointing_is_refused(ex: ModuleType, tmp_path: Path) -> None:
    data, model = _setup(ex, tmp_path)
    args = _args(ex, tmp_path, 1, activation_checkpointing=True,
                 activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match="use_reentrant"):
        BOGCTrainer(model=model, args=args, train_dataset=data)
