"""An MNIST-style script: train epochs with a fast loader, evaluate with a slow one between them.

    python eval_loader_train.py --epochs 2 --steps 20 --eval-sleep 0.02

Recorded with ``TRACEML_OUT``; prints one line per evaluation so tests can check timing.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import traceml


class SlowEval(Dataset):
    def __init__(self, n: int, sleep_s: float) -> None:
        self.x = torch.randn(n, 8)
        self.y = torch.randint(0, 2, (n,))
        self.sleep_s = sleep_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.sleep_s)
        return self.x[i], self.y[i]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-sleep", type=float, default=0.02)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n = args.steps * 4
    train = DataLoader(TensorDataset(torch.randn(n, 8), torch.randint(0, 2, (n,))), batch_size=4, shuffle=True)
    evaluation = DataLoader(SlowEval(8, args.eval_sleep), batch_size=2)
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            with traceml.trace_step(model):
                with traceml.trace_time("loss"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, _ in evaluation:
                model(x)
        print(f"eval epoch={epoch} seconds={time.perf_counter() - t0:.3f}", flush=True)
    traceml.shutdown()


if __name__ == "__main__":
    main()
