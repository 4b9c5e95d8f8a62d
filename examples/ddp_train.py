"""A tiny DistributedDataParallel run on CPU (gloo), for ``traceml run --nproc-per-node 2``.

    traceml run --nproc-per-node 2 examples/ddp_train.py --steps 200
    traceml run --nproc-per-node 2 examples/ddp_train.py --slow-rank 1 --slow-ms 5   # a straggler

Each rank trains the same small MLP on its shard of synthetic data; ``--slow-rank`` makes one
rank's input pipeline slower so the live view shows the skew.  Deterministic for a ``--seed``.
Works without torchrun too (a single rank, no process group).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import traceml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-rank", type=int, default=-1, help="rank whose input is slowed down (-1: none)")
    p.add_argument("--slow-ms", type=float, default=0.0, help="extra input wait per step on --slow-rank")
    p.add_argument("--fail-at", type=int, default=-1, help="raise at this step (to try a crash)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * 32
    x = torch.randn(n, args.features, generator=g)
    w = torch.randn(args.features, 1, generator=g)
    y = (x @ w + 0.1 * torch.randn(n, 1, generator=g)).squeeze(1)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, seed=args.seed) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)

    model: nn.Module = nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    step, epoch = 0, 0
    while step < args.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            if rank == args.slow_rank and args.slow_ms > 0:
                time.sleep(args.slow_ms / 1000)
            with traceml.trace_step(model):
                if step == args.fail_at:
                    raise RuntimeError(f"rank {rank}: failing at step {step} as asked (--fail-at)")
                loss = nn.functional.mse_loss(model(xb).squeeze(1), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1
            if rank == 0 and args.log_every and step % args.log_every == 0:
                print(f"step {step}/{args.steps}  loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
