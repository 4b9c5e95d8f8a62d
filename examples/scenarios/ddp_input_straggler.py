"""Scenario: 2-rank DDP (gloo) where rank 1's input pipeline is slower — an input straggler.

    traceml run --ui none --nproc-per-node 2 --out ddp_input_straggler.tml \\
        examples/scenarios/ddp_input_straggler.py --steps 200

Known behaviour: ``--slow-rank`` (default 1) waits ``--sleep-ms`` per sample in its Dataset's
``__getitem__``; the other rank's data is in memory.  DDP's all-reduce makes the fast rank wait
inside its backward, so every step takes as long as the slow rank's.  The diagnosis is
``STRAGGLER`` with culprit rank 1 and cause ``input`` (its dataloader phase is the gap).
Deterministic for a ``--seed``; one CPU thread per rank.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import traceml


class ShardData(Dataset):
    """Synthetic regression samples; ``sleep_ms`` of waiting per sample (0 on the fast ranks)."""

    def __init__(self, n: int, features: int, seed: int, sleep_ms: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.sleep_s = sleep_ms / 1000

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep_s > 0:
            time.sleep(self.sleep_s)
        return self.x[i], self.y[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--slow-rank", type=int, default=1, help="rank whose Dataset is slow (-1: none)")
    p.add_argument("--sleep-ms", type=float, default=1.0, help="wait per sample on --slow-rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="rank 0 prints 'step N' every N steps (0: never)")
    args = p.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    sleep_ms = args.sleep_ms if rank == args.slow_rank else 0.0
    data = ShardData(args.batch_size * 64, args.features, args.seed, sleep_ms)
    sampler: DistributedSampler[int] | None = DistributedSampler(data, seed=args.seed) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)
    model: nn.Module = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 1),
    )
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    step, epoch = 0, 0
    while step < args.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            with traceml.trace_step(model):
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP's all-reduce: the fast rank waits here for the slow one
                optimizer.step()
            step += 1
            if rank == 0 and args.log_every and step % args.log_every == 0:
                print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
