"""Scenario: 2-rank DDP (gloo) where rank 1's forward does extra work — a compute straggler.

    traceml run --ui none --nproc-per-node 2 --out ddp_compute_straggler.tml \\
        examples/scenarios/ddp_compute_straggler.py --steps 200

Known behaviour: on ``--slow-rank`` (default 1) the model's forward also runs ``--extra-matmuls``
no-grad matmuls (think of a metric or an auxiliary head computed only there).  The extra work is
in *forward* on purpose: DDP's all-reduce equalises backward (the fast rank waits inside its
backward), so a slow backward could not be told apart on the CPU clock.  The diagnosis is
``STRAGGLER`` with culprit rank 1 and cause ``compute`` (its forward phase is the gap).
Deterministic for a ``--seed``; one CPU thread per rank; data in memory (no input wait).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import traceml


class MLPWithSideWork(nn.Module):
    """An MLP whose forward also runs ``extra_matmuls`` matmuls outside autograd."""

    def __init__(self, features: int, hidden: int, extra_matmuls: int, seed: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        g = torch.Generator().manual_seed(seed + 7)
        # a plain attribute, not a buffer: DDP would broadcast a buffer every step
        self.side = torch.randn(hidden, hidden, generator=g) / hidden**0.5
        self.extra_matmuls = extra_matmuls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_matmuls:
            with torch.no_grad():
                h = self.side
                for _ in range(self.extra_matmuls):
                    h = torch.tanh(h @ self.side)
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--slow-rank", type=int, default=1, help="rank whose forward does extra work (-1: none)")
    p.add_argument("--extra-matmuls", type=int, default=8, help="hidden x hidden matmuls per forward on --slow-rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="rank 0 prints 'step N' every N steps (0: never)")
    args = p.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(args.seed + rank)
    n = args.batch_size * 16
    x = torch.randn(n, args.features, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    extra = args.extra_matmuls if rank == args.slow_rank else 0
    model: nn.Module = MLPWithSideWork(args.features, args.hidden, extra, args.seed)
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    batches = n // args.batch_size
    for step in range(args.steps):
        i = (step % batches) * args.batch_size
        xb, yb = x[i : i + args.batch_size], y[i : i + args.batch_size]
        with traceml.trace_step(model):
            loss = nn.functional.mse_loss(model(xb), yb)  # rank 1's forward is the slow part
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP's all-reduce: rank 0 waits here for rank 1
            optimizer.step()
        if rank == 0 and args.log_every and (step + 1) % args.log_every == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
