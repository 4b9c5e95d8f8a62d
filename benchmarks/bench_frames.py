"""traceml's Python work per step on the tiny loop: frames and bytecode lines (counts, not times).

    python benchmarks/bench_frames.py                          # this tree (the C fast path when built)
    TRACEML_PURE_PYTHON=1 python benchmarks/bench_frames.py    # the pure-Python reference

``sys.settrace`` counts the calls into traceml's own files and the lines they run over 126 steps of
``with traceml.trace_step(model):`` (the tiny loop of ``bench_vs_upstream.py`` under
``traceml.init(out=...)``, its threads running).  Load does not move these counts, which is why
they are the figure to compare on a shared machine; what each frame costs is ``bench_patches.py``'s.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traceml
from traceml.runtime import step as stepmod

STEPS = 126


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = 32 * (STEPS + 20)
    loader = DataLoader(TensorDataset(torch.randn(n, 32), torch.randint(0, 10, (n,))), batch_size=32, shuffle=True)
    root = os.path.dirname(os.path.abspath(traceml.__file__))
    counts = {"frames": 0, "lines": 0}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            counts["lines"] += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(root):
            if event == "call":
                counts["frames"] += 1
            return local
        return None

    with tempfile.TemporaryDirectory() as tmp:
        traceml.init(out=os.path.join(tmp, "run.tml"))
        it = iter(loader)

        def loop(steps: int) -> None:
            for _ in range(steps):
                x, y = next(it)
                with traceml.trace_step(model):
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()

        loop(10)  # first-step work (model adoption, environment) left out
        sys.settrace(tracer)
        try:
            loop(STEPS)
        finally:
            sys.settrace(None)
        traceml.shutdown()
    impl = "C fast path" if getattr(stepmod, "FAST", None) is not None else "pure Python"
    print(f"| {impl} | {counts['frames'] / STEPS:.2f} | {counts['lines'] / STEPS:.1f} |")


if __name__ == "__main__":
    main()
