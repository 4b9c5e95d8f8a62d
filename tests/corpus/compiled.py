"""A ``torch.compile``d MLP classifier (the default inductor backend needs a C compiler and
tens of seconds on a CPU; ``--backend`` defaults to ``aot_eager`` so CI stays fast, the
traced module is the same ``OptimizedModule``).  Plain PyTorch unless ``--traced``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))
    model = torch.compile(model, backend=args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    x, y = torch.randn(256, 128), torch.randint(0, 10, (256,))
    for _ in range(args.steps):
        with step_ctx():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    print(f"done loss={loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
