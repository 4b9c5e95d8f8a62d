"""A character-level GPT trained nanoGPT-style: batches sliced from a ``np.memmap`` by ``get_batch``.

Written for traceml's corpus (modelled on the shape of karpathy/nanoGPT's ``train.py``: memmap
data, ``get_batch(split)``, the next batch fetched inside the step, periodic ``estimate_loss``
under ``torch.no_grad()``).  Plain PyTorch unless ``--traced`` (then ``trace_step`` and
``trace_input``).  ``--slow-batch-ms`` makes every ``get_batch`` that much slower (the fault).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_embd: int = 32, n_head: int = 2, n_layer: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((block, block), -math.inf), diagonal=1))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for b in self.blocks:
            x = b(x, self.mask[:t, :t])
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--slow-batch-ms", type=float, default=0.0)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1337)
    block_size, batch_size, vocab = 32, 8, 65

    data_dir = tempfile.mkdtemp(prefix="chargpt-")
    for split, n in (("train", 20_000), ("val", 2_000)):
        np.random.default_rng(0).integers(0, vocab, n, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
        if args.slow_batch_ms:
            time.sleep(args.slow_batch_ms / 1000)  # a slow disk
        return x, y

    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        get_batch = traceml.trace_input(get_batch)

    model = CharGPT(vocab, block_size)
    if args.traced:
        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    @torch.no_grad()
    def estimate_loss() -> float:
        model.eval()
        losses = [model(*get_batch("val"))[1].item() for _ in range(4)]
        model.train()
        return sum(losses) / len(losses)

    X, Y = get_batch("train")
    for it in range(args.iters):
        if it and it % args.eval_interval == 0:
            print(f"iter {it}: val loss {estimate_loss():.3f}", flush=True)
        with step_ctx():
            _, loss = model(X, Y)
            X, Y = get_batch("train")  # prefetch while the step runs, as nanoGPT does
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(f"done loss={loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
