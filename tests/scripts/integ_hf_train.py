"""A tiny Hugging Face Trainer run for the integration tests: no traceml import, no downloads.

Run it under ``traceml run`` (the TraceML callback is attached with no code change) or
plainly.  Each phase has a known floor so a test can check what landed where:

    --accum A        gradient_accumulation_steps (default 2)
    --steps N        optimizer steps (max_steps, default 4)
    --eval-every K   evaluate every K optimizer steps (0 = never; default 2)
    --eval-sleep S   seconds each evaluation item takes to fetch (default 0.05)
    --fwd-sleep S    seconds of every forward (default 0.004)
    --bwd-sleep S    seconds of every backward (default 0.003)
    --opt-sleep S    seconds of every optimizer step (default 0.002)
    --copy-sleep S   seconds of every batch's move to the device (default 0.003)
    --mode M         plain (a plain Trainer), callback (callbacks=[TraceMLCallback()]),
                     trainer (TraceMLTrainer, with a TraceMLCallback passed as well)
    --fail-at I      raise RuntimeError in the I-th training forward (0-based micro-batch)

Prints ``RESULT {json}`` at the end: the optimizer steps taken and evaluations run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn


class SlowCopy:
    """A batch member whose trip to the device takes ``sleep`` seconds (Accelerate calls ``.to``)."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.device = "cpu"

    def to(self, device: object, *args: object, **kwargs: object) -> SlowCopy:
        time.sleep(self.sleep)
        moved = SlowCopy(self.sleep)
        moved.device = str(device)
        return moved


class SlowBackward(torch.autograd.Function):
    sleep = 0.0

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(SlowBackward.sleep)
        return grad


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int, sleep: float = 0.0) -> None:
        self.n = n
        self.sleep = sleep

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(8, generator=g), "labels": torch.tensor(float(i % 2))}


class TinyRegressor(nn.Module):
    """Returns {"loss", "logits"} like a transformers model."""

    def __init__(self, fwd_sleep: float, fail_at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.fwd_sleep = fwd_sleep
        self.fail_at = fail_at
        self.train_calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object) -> dict[str, torch.Tensor]:
        if self.training:
            if self.train_calls == self.fail_at:
                raise RuntimeError(f"boom in training forward {self.train_calls}")
            self.train_calls += 1
            time.sleep(self.fwd_sleep)
        out = SlowBackward.apply(self.net(x).squeeze(-1))
        loss = ((out - labels) ** 2).mean() if labels is not None else out.sum()
        return {"loss": loss, "logits": out}


class SlowSGD(torch.optim.SGD):
    sleep = 0.0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = super().step(closure)
        time.sleep(SlowSGD.sleep)
        return loss


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-sleep", type=float, default=0.05)
    p.add_argument("--fwd-sleep", type=float, default=0.004)
    p.add_argument("--bwd-sleep", type=float, default=0.003)
    p.add_argument("--opt-sleep", type=float, default=0.002)
    p.add_argument("--copy-sleep", type=float, default=0.003)
    p.add_argument("--mode", choices=("plain", "callback", "trainer"), default="plain")
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--out-dir", default=None)
    return p.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[object, list[int]]:
    """The Trainer for these options, and the list its evaluations are logged into."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    SlowBackward.sleep = a.bwd_sleep
    SlowSGD.sleep = a.opt_sleep

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, object]:
        batch: dict[str, object] = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        batch["payload"] = SlowCopy(a.copy_sleep)
        return batch

    evaluate = a.eval_every > 0
    args = TrainingArguments(
        output_dir=a.out_dir or os.path.join(os.getcwd(), "hf_out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=a.eval_every if evaluate else None,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = TinyRegressor(a.fwd_sleep, a.fail_at)
    kwargs: dict[str, object] = {
        "model": model,
        "args": args,
        "train_dataset": Items(4 * a.accum * a.steps),
        "eval_dataset": Items(8, sleep=a.eval_sleep) if evaluate else None,
        "data_collator": collate,
        "optimizers": (SlowSGD(model.parameters(), lr=0.05), None),
    }
    evaluations: list[int] = []

    class CountEvaluations(TrainerCallback):  # type: ignore[misc]
        def on_evaluate(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            evaluations.append(state.global_step)

    counter = CountEvaluations()
    if a.mode == "plain":
        trainer = Trainer(callbacks=[counter], **kwargs)
    else:
        from traceml.integrations.huggingface import TraceMLCallback, TraceMLTrainer

        cls = Trainer if a.mode == "callback" else TraceMLTrainer
        trainer = cls(callbacks=[counter, TraceMLCallback()], **kwargs)
    return trainer, evaluations


def traceml_callbacks(trainer: object) -> list[str]:
    cbs = trainer.callback_handler.callbacks  # type: ignore[attr-defined]
    return sorted(type(cb).__name__ for cb in cbs if "TraceML" in type(cb).__name__)


def main() -> None:
    a = parse()
    trainer, evaluations = build(a)
    attached = traceml_callbacks(trainer)
    print("ATTACHED " + json.dumps(attached), flush=True)
    trainer.train()  # type: ignore[attr-defined]
    steps = trainer.state.global_step  # type: ignore[attr-defined]
    print("RESULT " + json.dumps({"optimizer_steps": steps, "evaluations": evaluations, "traceml_callbacks": attached}))


if __name__ == "__main__":
    main()
