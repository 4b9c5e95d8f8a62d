"""A deterministic CPU training run for the fault tests and benchmarks: the same final loss
with traceml, without it, and whatever happens to the aggregator meanwhile.

    python fault_train.py --bare             # no traceml at all: the reference loss
    traceml run fault_train.py               # traced; the aggregator may be killed under it

Prints ``step N loss X`` every ``--log-every`` steps and, last, ``final loss <repr>`` (the
float's exact repr, so two runs compare bit for bit).  ``--step-sleep`` stretches each step
(time.sleep after the optimizer step) so that a kill lands at a random moment of a run of
known length; it does not change the arithmetic.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds slept in each step")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--bare", action="store_true", help="do not import traceml (the untraced reference)")
    args = p.parse_args()

    traced = not args.bare
    if traced:
        import traceml

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size * 32, args.features, generator=g)
    w = torch.randn(args.features, args.classes, generator=g)
    y = (x @ w).argmax(dim=1)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.classes),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    step = 0
    loss = torch.tensor(float("nan"))
    while step < args.steps:
        for xb, yb in loader:
            if step >= args.steps:
                break
            if traced:
                with traceml.trace_step(model):
                    loss = _step(model, optimizer, loss_fn, xb, yb)
            else:
                loss = _step(model, optimizer, loss_fn, xb, yb)
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"step {step} loss {loss.item():.6f}", flush=True)
            step += 1
    print(f"final loss {float(loss.item())!r}", flush=True)


def _step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, xb: torch.Tensor, yb: torch.Tensor
) -> torch.Tensor:
    loss = loss_fn(model(xb), yb)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


if __name__ == "__main__":
    main()
