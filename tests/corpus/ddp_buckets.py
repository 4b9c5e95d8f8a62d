"""DDP on gloo ranks with a chosen bucket size: many small buckets over a model with little
compute (communication-bound), or a model with real compute per sync.  ``--manual`` averages
the gradients by hand with ``dist.all_reduce`` per parameter instead of DDP (the pre-DDP tutorial
way); ``--manual-async`` issues those all-reduces with ``async_op=True`` and waits for them all
before the optimizer step (overlapping them with each other).  Plain PyTorch unless ``--traced``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--manual-async", action="store_true")
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    world = dist.get_world_size()
    model: nn.Module = nn.Sequential(*layers)
    args.manual = args.manual or args.manual_async
    if not args.manual:
        model = DDP(model, bucket_cap_mb=args.bucket_mb)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.width)
        with step_ctx():
            model(x).square().mean().backward()
            if args.manual_async:
                works = [dist.all_reduce(p_.grad, async_op=True) for p_ in model.parameters()]
                for work in works:
                    work.wait()
                for p_ in model.parameters():
                    p_.grad /= world
            elif args.manual:
                for p_ in model.parameters():
                    dist.all_reduce(p_.grad)
                    p_.grad /= world
            opt.step()
            opt.zero_grad()
    dist.barrier()
    dist.destroy_process_group()
    print("done", flush=True)


if __name__ == "__main__":
    main()
