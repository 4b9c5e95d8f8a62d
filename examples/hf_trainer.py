"""Fine-tune a tiny BERT classifier with the Hugging Face Trainer, traced by traceml with no code change.

    traceml run examples/hf_trainer.py                 # the TraceML callback is attached on import
    traceml run examples/hf_trainer.py --steps 10      # shorter
    TRACEML_OUT=hf.tml python examples/hf_trainer.py --explicit   # no launcher: TraceMLTrainer + a local .tml
    python examples/hf_trainer.py                      # plain python: trains, records nothing

Offline: the model is built from a small ``BertConfig`` (no download) and the data are random
token ids whose label is whether the first token is in the upper half of the vocabulary.  Each
traced step is one optimizer step of ``--accum`` micro-batches; the evaluations every
``--eval-every`` steps are not part of any step.  Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch.utils.data import Dataset

VOCAB = 512
SEQ = 16


class FirstTokenTask(Dataset):
    """Random token ids; label 1 when the first token is in the upper half of the vocabulary."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": torch.tensor(int(ids[0] >= VOCAB // 2)),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N optimizer steps (0: never)")
    p.add_argument("--explicit", action="store_true", help="use traceml's TraceMLTrainer instead of Trainer")
    p.add_argument("--out-dir", default="traceml_runs/hf_trainer_example")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(a.seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    evaluate = a.eval_every > 0
    args = TrainingArguments(
        output_dir=a.out_dir,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=32,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        learning_rate=1e-3,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=a.eval_every if evaluate else None,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=a.seed,
    )
    trainer_cls = Trainer
    if a.explicit:
        from traceml.integrations.huggingface import TraceMLTrainer

        trainer_cls = TraceMLTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=FirstTokenTask(a.batch_size * a.accum * a.steps, a.seed),
        eval_dataset=FirstTokenTask(128, a.seed + 1) if evaluate else None,
    )
    trainer.train()
    if evaluate:
        print(f"final eval loss {trainer.evaluate()['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
