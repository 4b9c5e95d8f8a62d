"""Scenario: a healthy, compute-bound run — a wide MLP fed from tensors already in memory.

    traceml run --ui none --out compute_bound.tml examples/scenarios/compute_bound.py --steps 200

Known behaviour: forward + backward + optimizer take nearly all of every step (no DataLoader,
no logging inside the step), so the diagnosis is ``COMPUTE_BOUND`` (info) — the verdict
docs/diagnosis.md gives a healthy run whose model phases fill the step.  Deterministic for a
``--seed``; one CPU thread.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import traceml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print 'step N' every N steps (0: never)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * 16
    x = torch.randn(n, args.features, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    model = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.classes),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    batches = n // args.batch_size
    for step in range(args.steps):
        i = (step % batches) * args.batch_size
        xb, yb = x[i : i + args.batch_size], y[i : i + args.batch_size]  # in memory: no input wait
        with traceml.trace_step(model):
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
