"""A tiny Lightning run for the integration tests: no traceml import, no downloads.

Run it under ``traceml run`` (the TraceML callback is attached with no code change) or
plainly.  Each phase has a known floor so a test can check what landed where:

    --flavor F       lightning.pytorch (default) or pytorch_lightning
    --accum A        accumulate_grad_batches (default 2)
    --batches B      training batches (limit_train_batches, default 8)
    --val-every V    validate every V training batches (0 = never; default 3, i.e. inside
                     an accumulation window when A = 2); the sanity check runs too
    --val-sleep S    seconds each validation item takes to fetch (default 0.05)
    --fwd-sleep S    seconds of every training_step (default 0.004)
    --bwd-sleep S    seconds of every backward (default 0.003)
    --opt-sleep S    seconds of every optimizer step (default 0.002)
    --copy-sleep S   seconds of every batch's move to the device (default 0.003)
    --manual         manual optimization (the training_step calls backward and step itself)
    --callback       pass callbacks=[TraceMLCallback()] explicitly
    --fail-at I      raise RuntimeError in the I-th training_step (0-based batch)

Prints ``RESULT {json}`` at the end: the optimizer steps taken and validations run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time
import warnings
from typing import Any

import torch
from torch import nn


class SlowCopy:
    """A batch member whose trip to the device takes ``sleep`` seconds (Lightning calls ``.to``)."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def to(self, device: object, *args: object, **kwargs: object) -> SlowCopy:
        time.sleep(self.sleep)
        return SlowCopy(self.sleep)


class SlowBackward(torch.autograd.Function):
    sleep = 0.0

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(SlowBackward.sleep)
        return grad


class SlowSGD(torch.optim.SGD):
    sleep = 0.0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = super().step(closure)
        time.sleep(SlowSGD.sleep)
        return loss


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int, sleep: float = 0.0) -> None:
        self.n = n
        self.sleep = sleep

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        g = torch.Generator().manual_seed(i)
        return torch.randn(8, generator=g), torch.tensor(float(i % 2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--flavor", default="lightning.pytorch", choices=("lightning.pytorch", "pytorch_lightning"))
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--val-every", type=int, default=3)
    p.add_argument("--val-sleep", type=float, default=0.05)
    p.add_argument("--fwd-sleep", type=float, default=0.004)
    p.add_argument("--bwd-sleep", type=float, default=0.003)
    p.add_argument("--opt-sleep", type=float, default=0.002)
    p.add_argument("--copy-sleep", type=float, default=0.003)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--callback", action="store_true")
    p.add_argument("--fail-at", type=int, default=-1)
    return p.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[Any, Any, Any, Any, dict[str, int]]:
    """(trainer, module, train loader, val loader or None, counters) for these options."""
    warnings.filterwarnings("ignore")
    logging.getLogger(a.flavor).setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric" if a.flavor == "pytorch_lightning" else "lightning.fabric").setLevel(
        logging.ERROR
    )
    pl = importlib.import_module(a.flavor)
    torch.manual_seed(0)
    SlowBackward.sleep = a.bwd_sleep
    SlowSGD.sleep = a.opt_sleep
    counts = {"optimizer_steps": 0, "validations": 0, "batches": 0}

    class Tiny(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            self.automatic_optimization = not a.manual

        def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x, y, _payload = batch
            out = SlowBackward.apply(self.net(x).squeeze(-1))
            return ((out - y) ** 2).mean()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == a.fail_at:
                raise RuntimeError(f"boom in training_step {batch_idx}")
            counts["batches"] += 1
            time.sleep(a.fwd_sleep)
            loss = self._loss(batch)
            if not a.manual:
                return loss
            opt = self.optimizers()
            self.manual_backward(loss / a.accum)
            if (batch_idx + 1) % a.accum == 0:
                opt.step()
                opt.zero_grad()
            return loss

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self._loss(batch)

        def on_validation_end(self) -> None:
            counts["validations"] += 1

        def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
            counts["optimizer_steps"] += 1

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return SlowSGD(self.parameters(), lr=0.05)

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[object, ...]:
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs), torch.stack(ys), SlowCopy(a.copy_sleep)

    validate = a.val_every > 0
    train = torch.utils.data.DataLoader(Items(4 * a.batches), batch_size=4, collate_fn=collate)
    val = torch.utils.data.DataLoader(Items(8, sleep=a.val_sleep), batch_size=4, collate_fn=collate)
    callbacks = []
    if a.callback:
        from traceml.integrations.lightning import callback_class

        callbacks.append(callback_class(a.flavor)())
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=a.batches,
        accumulate_grad_batches=1 if a.manual else a.accum,
        val_check_interval=a.val_every if validate else None,
        limit_val_batches=2 if validate else 0,
        num_sanity_val_steps=2 if validate else 0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=os.getcwd(),
    )
    return trainer, Tiny(), train, val if validate else None, counts


def traceml_callbacks(trainer: Any) -> list[str]:
    return sorted(type(cb).__name__ for cb in trainer.callbacks if "TraceML" in type(cb).__name__)


def main() -> None:
    a = parse()
    trainer, module, train, val, counts = build(a)
    attached = traceml_callbacks(trainer)
    print("ATTACHED " + json.dumps(attached), flush=True)
    trainer.fit(module, train, val)
    print("RESULT " + json.dumps({**counts, "traceml_callbacks": attached}), flush=True)


if __name__ == "__main__":
    main()
