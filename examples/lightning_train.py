"""Train a tiny MLP with PyTorch Lightning, traced by traceml with no code change.

    traceml run examples/lightning_train.py                  # the TraceML callback is attached on import
    traceml run examples/lightning_train.py --epochs 1       # shorter
    TRACEML_OUT=pl.tml python examples/lightning_train.py --explicit   # no launcher: an explicit callback
    python examples/lightning_train.py                       # plain python: trains, records nothing

Works with ``lightning`` (``import lightning.pytorch``) and, with ``--flavor pytorch_lightning``,
the standalone ``pytorch_lightning`` package.  Synthetic data (Gaussian blobs), no download.
Each traced step is one optimizer step of ``--accum`` batches; validation and the sanity check
are not part of any step.  Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import importlib
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int, centers: torch.Tensor, seed: int) -> TensorDataset:
    """``n`` noisy samples around ``centers`` (one blob per class)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(centers), (n,), generator=g)
    return TensorDataset(centers[labels] + 2.0 * torch.randn(n, centers.shape[1], generator=g), labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="lightning.pytorch", choices=("lightning.pytorch", "pytorch_lightning"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--accum", type=int, default=2, help="accumulate_grad_batches")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--explicit", action="store_true", help="pass traceml's TraceMLCallback yourself")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl = importlib.import_module(a.flavor)
    pl.seed_everything(a.seed, verbose=False)
    features, classes = 32, 4

    class Classifier(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    callbacks = []
    if a.explicit:
        from traceml.integrations.lightning import callback_class

        callbacks.append(callback_class(a.flavor)())
    trainer = pl.Trainer(
        max_epochs=a.epochs,
        accumulate_grad_batches=a.accum,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(a.seed))
    train = DataLoader(blobs(a.samples, centers, a.seed + 1), batch_size=a.batch_size, shuffle=True)
    val = DataLoader(blobs(512, centers, a.seed + 2), batch_size=256)
    trainer.fit(Classifier(), train, val)
    print(f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}")


if __name__ == "__main__":
    main()
