"""A small CUDA training run for the GPU device check (benchmarks/gpu_device_check.sh)."""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import traceml


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = TensorDataset(torch.randn(4096, 1024), torch.randint(0, 10, (4096,)))
    loader = DataLoader(ds, batch_size=256, shuffle=True, pin_memory=True)
    step = 0
    while step < args.steps:
        for x, y in loader:
            with traceml.trace_step(model):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            if step >= args.steps:
                break
    print(f"final loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
