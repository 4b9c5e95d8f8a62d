"""A 2-rank gloo job that holds still while a test lists its listening sockets.

python listen_probe.py DIR    each rank: init gloo, all_reduce, write DIR/ready-<rank>,
                              wait (at most 120 s) for DIR/go, then leave the process group
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import traceml


def main() -> int:
    folder = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.ones(4)
    for _ in range(3):
        with traceml.trace_step():
            dist.all_reduce(t)
    (folder / f"ready-{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
