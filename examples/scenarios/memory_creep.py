"""Scenario: host memory creep — the loop keeps every step's activations in a list (a leak).

    traceml run --ui none --interval 0.2 --out memory_creep.tml examples/scenarios/memory_creep.py --steps 400

Known behaviour: after each step the script appends a fresh ``--leak-mb`` MiB tensor to a list
that is never cleared (the classic "kept a reference to a tensor for logging" leak), so the
process's RSS grows steadily by ~leak-mb per step.  With enough RSS samples (>= 60: a short
``--interval``) the creep is *confirmed* and the diagnosis is ``MEMORY_CREEP`` (warn, source
host RSS).  The leak is outside the traced step, and the model is big enough (tens of ms
per step) for the run to last long enough for those samples; its step phases stay those of a
healthy compute-bound model.  Deterministic for a ``--seed``; one CPU thread.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import traceml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--leak-mb", type=float, default=1.0, help="MiB kept alive after every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print 'step N' every N steps (0: never)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * 16
    x = torch.randn(n, args.features, generator=g)
    y = x.sum(dim=1, keepdim=True)
    model = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)

    kept: list[torch.Tensor] = []  # the leak: grows by one tensor per step, never cleared
    leak_numel = int(args.leak_mb * 1024 * 1024) // 4
    batches = n // args.batch_size
    for step in range(args.steps):
        i = (step % batches) * args.batch_size
        xb, yb = x[i : i + args.batch_size], y[i : i + args.batch_size]
        with traceml.trace_step(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        kept.append(torch.full((leak_numel,), float(step)))  # written, so the pages are resident
        if args.log_every and (step + 1) % args.log_every == 0:
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.4f} kept {len(kept) * args.leak_mb:.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
