"""A small CPU training run for the traceml demo (``make demo``): an MLP on synthetic data.

    traceml run examples/demo_train.py                # live view + traceml_runs/<run>/run.tml
    traceml run examples/demo_train.py --steps 200    # shorter
    python examples/demo_train.py --steps 50          # plain python: runs, records nothing

The only traceml line is ``with traceml.trace_step(model):``.  The input pipeline does a little
work per sample (``--input-cost``), so the dataloader phase is visible next to forward,
backward and optimizer.  Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import traceml


class NoisyBlobs(Dataset):
    """Gaussian blobs, one per class; each sample costs ``input_cost`` small matmuls to build."""

    def __init__(self, n: int, features: int, classes: int, seed: int, input_cost: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(classes, features, generator=g) * 0.15
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.noise_seed = seed + 1
        self.features = features
        self.input_cost = input_cost
        self.mix = torch.randn(features, features, generator=g) / math.sqrt(features)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + i)
        x = self.centers[self.labels[i]] + torch.randn(self.features, generator=g)
        for _ in range(self.input_cost):  # stands in for decoding / augmentation
            x = torch.tanh(x @ self.mix) + x
        return x, self.labels[i]


def build_model(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000: ~30 s on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--input-cost", type=int, default=2, help="work per sample in the dataloader")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps (0: never)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data = NoisyBlobs(args.batch_size * 64, args.features, args.classes, args.seed, args.input_cost)
    loader = DataLoader(
        data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    model = build_model(args.features, args.hidden, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    step = 0
    while step < args.steps:
        for x, y in loader:
            with traceml.trace_step(model):
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1
            if args.log_every and step % args.log_every == 0:
                print(f"step {step}/{args.steps}  loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
    print(f"done: {step} steps, final loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
