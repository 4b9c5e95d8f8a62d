"""An MNIST-style CNN fed by a ``DataLoader`` (modelled on the shape of pytorch/examples ``mnist``).

Synthetic 28x28 digits (no download).  Plain PyTorch unless ``--traced``.  ``--slow-loader-ms``
makes every batch that much slower to produce (the fault: a slow loader).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset


class Digits(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(16 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--slow-loader-ms", type=float, default=0.0)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if args.slow_loader_ms:
            time.sleep(args.slow_loader_ms / 1000)  # slow decoding / augmentation
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    batch = 16
    train_loader = DataLoader(Digits(batch * args.batches), batch_size=batch, shuffle=True, collate_fn=collate)
    test_loader = DataLoader(Digits(64), batch_size=32)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    for epoch in range(args.epochs):
        model.train()
        for data, target in train_loader:
            with step_ctx():
                optimizer.zero_grad()
                loss = F.nll_loss(model(data), target)
                loss.backward()
                optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                correct += int((model(data).argmax(1) == target).sum())
        print(f"epoch {epoch}: loss {loss.item():.3f} test accuracy {correct}/64", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
