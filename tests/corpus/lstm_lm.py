"""A word-level LSTM language model with truncated BPTT (modelled on the shape of
pytorch/examples ``word_language_model``): batchified token stream, hidden state detached
between chunks, gradient clipping, manual-free ``SGD``.  Synthetic corpus.  Plain PyTorch unless
``--traced``; ``--sleep-ms`` adds that much unnamed work to every step (the fault).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 128, nhid: int = 256, nlayers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.1)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.nlayers, bsz, self.nhid), torch.zeros(self.nlayers, bsz, self.nhid)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bptt", type=int, default=20)
    p.add_argument("--chunks", type=int, default=60)
    p.add_argument("--sleep-ms", type=float, default=0.0)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1111)
    ntokens, bsz = 500, 16
    train_data = batchify(torch.randint(0, ntokens, (bsz * args.bptt * args.chunks + 1,)), bsz)
    model = RNNModel(ntokens)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        step_ctx = lambda: traceml.trace_step(model)  # noqa: E731
    hidden = model.init_hidden(bsz)
    model.train()
    for i in range(0, train_data.size(0) - 1, args.bptt):
        seq_len = min(args.bptt, len(train_data) - 1 - i)
        if seq_len < 2:
            break
        data, targets = train_data[i : i + seq_len], train_data[i + 1 : i + 1 + seq_len].reshape(-1)
        with step_ctx():
            hidden = tuple(h.detach() for h in hidden)
            optimizer.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            if args.sleep_ms:
                time.sleep(args.sleep_ms / 1000)  # e.g. synchronous logging to a slow sink
            optimizer.step()
    print(f"done loss={loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
