"""A small CPU training script for the rank-runtime tests (run by plain python, the executor
or torchrun).  Prints one line ``done rank=R steps=N`` when it finishes normally.

    --steps N        training steps (default 20)
    --ddp            init a gloo process group from torchrun's variables and wrap in DDP
    --fail-at K      raise RuntimeError("boom at step K") inside step K
    --exit-code C    sys.exit(C) after training
    --init           call traceml.init() explicitly (else the first trace_step does)
    --out PATH       traceml.init(out=PATH)
    --no-torch       do not import torch at all; just print whether it is loaded (then
                     --init starts traceml, --raise ends with an uncaught exception)
    --regions        also time a trace_time region per step
"""

from __future__ import annotations

import argparse
import os
import sys

import traceml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--init", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--regions", action="store_true")
    p.add_argument("--raise", dest="raise_", action="store_true")
    p.add_argument("extra", nargs="*", help="ignored; shows that arguments reach the script")
    args = p.parse_args()

    if args.no_torch:
        if args.init:
            traceml.init()
        print(f"torch loaded: {'torch' in sys.modules}; name={__name__}; argv={sys.argv[1:]}", flush=True)
        if args.raise_:
            raise KeyError("uncaught on purpose")
        return args.exit_code

    if args.init or args.out:
        traceml.init(out=args.out)

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ.get("RANK", "0"))
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(args.steps * 8, 32), torch.randint(0, 4, (args.steps * 8,)))
    loader = DataLoader(data, batch_size=8)
    steps = 0
    for i, (x, y) in enumerate(loader):
        with traceml.trace_step(model):
            if args.regions:
                with traceml.trace_time("loss"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i == args.fail_at:
                raise RuntimeError(f"boom at step {i}")
        steps += 1
    if args.ddp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    print(f"done rank={rank} steps={steps}", flush=True)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
