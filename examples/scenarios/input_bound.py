"""Scenario: an input-bound run — every sample's ``__getitem__`` sleeps (slow disk or decoding).

    traceml run --ui none --out input_bound.tml examples/scenarios/input_bound.py --steps 200

Known behaviour: the training loop spends most of each step waiting for the DataLoader
(``--sleep-ms`` per sample x ``--batch-size`` samples, against a model that needs a few ms),
so the diagnosis is ``INPUT_BOUND`` (critical: the dataloader share is far over 25 %).
Deterministic for a ``--seed``; one CPU thread, no DataLoader workers.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import traceml


class SlowDataset(Dataset):
    """Synthetic regression samples; each one costs ``sleep_ms`` of waiting, like a slow read."""

    def __init__(self, n: int, features: int, seed: int, sleep_ms: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.sleep_s = sleep_ms / 1000

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.sleep_s)
        return self.x[i], self.y[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--sleep-ms", type=float, default=1.0, help="wait per sample in __getitem__")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print 'step N' every N steps (0: never)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data = SlowDataset(args.batch_size * 32, args.features, args.seed, args.sleep_ms)
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    step = 0
    while step < args.steps:
        for xb, yb in loader:  # the wait for the next batch is the dataloader phase of the step below
            with traceml.trace_step(model):
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1
            if args.log_every and step % args.log_every == 0:
                print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
