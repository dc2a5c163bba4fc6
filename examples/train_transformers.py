"""Train a small two-modality model with BOGC inside the Hugging Face ``Trainer``.

Run::

    pip install "torch==2.13.0" && pip install ".[torch,transformers]"
    python examples/train_transformers.py [--steps 60] [--method bogc|sum]

The model (a ``PreTrainedModel`` with its own config) has an encoder per
modality, a head per modality and a fusion head. Its forward returns the
per-example loss of each source under ``"losses"``; ``BOGCTrainer`` turns them
into one calibrated gradient per step. ``--method sum`` trains the same model
with the plain ``transformers.Trainer`` on the summed loss, for comparison.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from bogc_core.integrations.transformers import BOGCTrainer
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from bogc_core import CalibrationConfig


class TinyFusionConfig(PretrainedConfig):
    """Sizes of :class:`TinyFusionModel`."""

    model_type = "bogc-tiny-fusion"

    def __init__(self, dim_a: int = 8, dim_b: int = 6, hidden: int = 16, n_classes: int = 3,
                 **kwargs: object) -> None:
        self.dim_a = dim_a
        self.dim_b = dim_b
        self.hidden = hidden
        self.n_classes = n_classes
        super().__init__(**kwargs)


class TinyFusionModel(PreTrainedModel):
    """Two encoders, a head per modality and a fusion head; returns the losses per source."""

    config_class = TinyFusionConfig
    base_model_prefix = "tiny"

    def __init__(self, config: TinyFusionConfig) -> None:
        super().__init__(config)
        h, c = config.hidden, config.n_classes
        self.enc_a = nn.Linear(config.dim_a, h)
        self.enc_b = nn.Linear(config.dim_b, h)
        self.head_a = nn.Linear(h, c)
        self.head_b = nn.Linear(h, c)
        self.fusion = nn.Linear(2 * h, c)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.3)
            nn.init.zeros_(module.bias)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, object]:
        za, zb = torch.tanh(self.enc_a(x_a)), torch.tanh(self.enc_b(x_b))
        logits = self.fusion(torch.cat([za, zb], dim=-1))
        out: dict[str, object] = {"logits": logits}
        if labels is not None:
            losses = {
                "fusion": F.cross_entropy(logits, labels, reduction="none"),
                "a": F.cross_entropy(self.head_a(za), labels, reduction="none"),
                "b": F.cross_entropy(self.head_b(zb), labels, reduction="none"),
            }
            out["losses"] = losses
            out["loss"] = sum(v.mean() for v in losses.values())
        return out


class TwoViewData(torch.utils.data.Dataset):
    """A class label and two noisy views of it: view ``a`` informative, view ``b`` weak."""

    def __init__(self, n: int = 256, n_classes: int = 3, seed: int = 0) -> None:
        # the class prototypes are the same for every split; ``seed`` draws the samples
        protos = torch.Generator().manual_seed(1234)
        proto_a = torch.randn(n_classes, 8, generator=protos)
        proto_b = torch.randn(n_classes, 6, generator=protos)
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, n_classes, (n,), generator=g)
        self.x_a = proto_a[self.y] + 0.7 * torch.randn(n, 8, generator=g)
        self.x_b = 0.3 * proto_b[self.y] + torch.randn(n, 6, generator=g)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x_a": self.x_a[i], "x_b": self.x_b[i], "labels": self.y[i]}


def training_args(out_dir: str, steps: int, batch: int = 64, lr: float = 0.1,
                  seed: int = 0) -> TrainingArguments:
    """Quiet CPU arguments: plain SGD at a constant rate, no clipping, no checkpoints."""
    return TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, warmup_steps=0, save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=seed, data_seed=seed,
        remove_unused_columns=False,
    )


def accuracy(model: TinyFusionModel, data: TwoViewData) -> float:
    with torch.no_grad():
        logits = model(x_a=data.x_a, x_b=data.x_b)["logits"]
    return float((logits.argmax(-1) == data.y).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--method", choices=["bogc", "sum"], default="bogc",
                   help="BOGCTrainer (bogc) or the plain Trainer on the summed loss (sum)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train, test = TwoViewData(512, seed=0), TwoViewData(512, seed=1)
    model = TinyFusionModel(TinyFusionConfig())
    with tempfile.TemporaryDirectory() as out_dir:
        targs = training_args(out_dir, args.steps)
        if args.method == "bogc":
            trainer: Trainer = BOGCTrainer(model=model, args=targs, train_dataset=train,
                                           bogc_config=CalibrationConfig(), samples="microbatch")
        else:
            trainer = Trainer(model=model, args=targs, train_dataset=train)
        result = trainer.train()
    print(f"{args.method}: training loss {result.training_loss:.4f}, "
          f"test accuracy {accuracy(model, test):.3f}")


if __name__ == "__main__":
    main()
