"""A small CPU training loop for the "one answer per question" tests (plain python or torchrun).

--steps N           training steps (default 40)
--ddp               a gloo process group from torchrun's variables, the model in DDP
--out PATH          traceml.init(out=PATH) (a local recording, no aggregator)
--get-batch-ms M    inside each step, a ``trace_time("get_batch")`` region that sleeps M ms
--eval-every K      every K steps, between steps, a ``trace_time("eval")`` region ...
--eval-ms E         ... that sleeps E ms (time outside any step)
--wrap-forward      a ``trace_time("model")`` region around the forward pass and the loss
--exit-before-step C  start traceml, then exit with status C before the first step
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import traceml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--get-batch-ms", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-ms", type=float, default=0.0)
    p.add_argument("--exit-before-step", type=int, default=None)
    p.add_argument("--wrap-forward", action="store_true")
    args = p.parse_args()

    traceml.init(out=args.out)
    if args.exit_before_step is not None:
        print("giving up before the first step", flush=True)
        return args.exit_before_step

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ.get("RANK", "0"))
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x_all = torch.randn(256, 64)
    y_all = torch.randint(0, 4, (256,))

    def get_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if args.get_batch_ms:
            time.sleep(args.get_batch_ms / 1000)
        lo = (i * 16) % 240
        return x_all[lo : lo + 16], y_all[lo : lo + 16]

    for i in range(args.steps):
        with traceml.trace_step(model):
            if args.get_batch_ms:
                with traceml.trace_time("get_batch"):
                    x, y = get_batch(i)
            else:
                x, y = get_batch(i)
            if args.wrap_forward:
                with traceml.trace_time("model"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if args.eval_every and (i + 1) % args.eval_every == 0:
            with traceml.trace_time("eval"):
                time.sleep(args.eval_ms / 1000)
    if args.ddp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    traceml.shutdown()
    print(f"done rank={rank} steps={args.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
