"""The ToyModel of the PyTorch DDP tutorial on two gloo ranks (``torchrun``-style environment).

Plain PyTorch unless ``--traced``.  ``--slow-rank R --slow-ms M`` makes rank R spend M ms more
per step before its forward (the fault: one slow rank).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(64, 256)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    ddp_model = DDP(ToyModel())
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.001)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(ddp_model)  # noqa: E731
    for _ in range(args.steps):
        with step_ctx():
            if rank == args.slow_rank:
                time.sleep(args.slow_ms / 1000)  # this rank's host does something slow every step
            optimizer.zero_grad()
            outputs = ddp_model(torch.randn(32, 64))
            loss_fn(outputs, torch.randn(32, 8)).backward()
            optimizer.step()
    dist.barrier()
    dist.destroy_process_group()
    print(f"done rank={rank} world={os.environ.get('WORLD_SIZE')}", flush=True)


if __name__ == "__main__":
    main()
