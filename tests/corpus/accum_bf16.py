"""Gradient accumulation under bf16 autocast (the common fine-tuning loop: ``loss / accum``,
``optimizer.step()`` every ``--accum`` micro-batches, a cosine LR scheduler).  Plain PyTorch
unless ``--traced`` (one ``trace_step`` per optimizer step).  ``--sleep-ms`` adds that much
unnamed work to every optimizer step (the fault: a sleep in the step).  ``--leak-mb`` keeps that
many MiB (touched) per step alive (the fault: a host leak); ``--grow-mb N --grow-steps K`` keeps
N MiB per step for the first K steps only (a warm-up that then stays flat: no leak).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--sleep-ms", type=float, default=0.0)
    p.add_argument("--leak-mb", type=float, default=0.0)
    p.add_argument("--grow-mb", type=float, default=0.0)
    p.add_argument("--grow-steps", type=int, default=0)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 192), nn.ReLU(), nn.Linear(192, 96), nn.ReLU(), nn.Linear(96, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    data = [(torch.randn(32, 96), torch.randint(0, 4, (32,))) for _ in range(16)]
    kept: list[bytearray] = []  # e.g. losses kept with their graphs, a cache that never evicts
    for step in range(args.steps):
        with step_ctx():
            for micro in range(args.accum):
                x, y = data[(step * args.accum + micro) % len(data)]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x), y) / args.accum
                loss.backward()
            if args.sleep_ms:
                time.sleep(args.sleep_ms / 1000)
            mb = args.leak_mb or (args.grow_mb if step < args.grow_steps else 0.0)
            if mb:
                kept.append(bytearray(b"\x01") * int(mb * 1024 * 1024))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    print(f"done loss={loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
