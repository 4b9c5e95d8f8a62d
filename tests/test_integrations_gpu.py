"""The integrations on CUDA (skipped without a GPU): the GPU clock of each phase (STEP_GPU rows
from the runtime's CUDA events) for a Hugging Face Trainer and a Lightning Trainer.

* HF: Accelerate copies each batch to the GPU while it is fetched, before the step opens; the
  copy still lands in the step's h2d, on the CPU clock and on the GPU clock (upstream #276).
* Lightning runs forward and backward inside ``optimizer.step(closure)``: the optimizer's GPU
  time must be the parameter update alone, not the closure's heavy forward.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

if torch.cuda.is_available():
    # the machine's own helpers, started on first use, before any test's leak check: CUDA's, and
    # the MPI daemon (orted) Lightning's MPI detection starts where mpi4py is installed
    torch.cuda.init()
    torch.ones(1, device="cuda").sum().item()
    if importlib.util.find_spec("mpi4py") is not None:
        from mpi4py import MPI

        MPI.COMM_WORLD.Get_size()

import traceml  # noqa: E402
from traceml.config import RankConfig  # noqa: E402
from traceml.runtime import api  # noqa: E402
from traceml.runtime.agent import Agent  # noqa: E402
from traceml.schema import STEP_GPU, STEP_TIME  # noqa: E402
from traceml.transport import RankIdentity  # noqa: E402


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.chdir(tmp_path)
    # no threads, no sink, but CUDA event timing on (the test resolves the events itself)
    a = Agent(RankConfig(), start=False, identity=RankIdentity(host="t", pid=os.getpid()), gpu_timing=True)
    monkeypatch.setattr(api, "_agent", a)
    yield a
    traceml.shutdown()


def step_rows(agent: Any) -> list[dict[str, int]]:
    return [dict(zip(STEP_TIME.names, r, strict=True)) for r in agent.tables["step_time"].recent()]


def gpu_rows(agent: Any) -> list[dict[str, int]]:
    torch.cuda.synchronize()
    agent._resolve_gpu()  # what the sender thread does (no thread here)
    return [dict(zip(STEP_GPU.names, r, strict=True)) for r in agent.tables["step_gpu"].recent()]


class Heavy(torch.nn.Module):
    """A forward with real GPU work (a few 2048^2 matmuls) and few parameters."""

    def __init__(self, width: int = 2048, depth: int = 6) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, width)
        self.out = torch.nn.Linear(width, 1)
        self.depth = depth
        self.register_buffer("mix", torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kw: Any) -> Any:
        h = self.inp(x)
        for _ in range(self.depth):
            h = torch.tanh(h @ self.mix)
        y = self.out(h).squeeze(-1)
        if labels is None:
            return y
        return {"loss": ((y - labels) ** 2).mean(), "logits": y}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, rows: int = 256) -> None:
        self.x = torch.randn(n, rows, 16)  # several rows per item: a copy worth timing
        self.y = torch.randn(n, rows)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_hf_copies_before_the_step_are_h2d_on_both_clocks(agent: Any, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from traceml.integrations.huggingface import TraceMLCallback

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=Heavy(),
        args=args,
        train_dataset=Rows(64),
        eval_dataset=Rows(16),
        callbacks=[TraceMLCallback()],
    )
    trainer.train()
    steps = step_rows(agent)
    assert [r["step"] for r in steps] == [0, 1, 2]
    for r in steps:
        assert r["h2d_us"] > 0 and r["forward_us"] > 0 and r["backward_us"] > 0 and r["optimizer_us"] > 0, r
    gpu = gpu_rows(agent)
    assert [r["step"] for r in gpu] == [0, 1, 2]
    for r in gpu:
        assert r["h2d_gpu_us"] > 0, r  # the copies Accelerate made before the step opened
        assert r["forward_gpu_us"] > 0 and r["backward_gpu_us"] > 0 and r["optimizer_gpu_us"] > 0, r
        assert r["step_gpu_us"] >= r["forward_gpu_us"] + r["backward_gpu_us"], r


@pytest.mark.parametrize("flavor", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_optimizer_gpu_time_excludes_the_closure(agent: Any, flavor: str) -> None:
    pl = pytest.importorskip(flavor)
    from traceml.integrations.lightning import callback_class

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = Heavy(depth=12)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(batch["x"], batch["labels"])["loss"]

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(batch["x"], batch["labels"])["loss"]

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    loader = torch.utils.data.DataLoader(Rows(64), batch_size=8)
    val = torch.utils.data.DataLoader(Rows(16), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        val_check_interval=3,
        accumulate_grad_batches=2,
        accelerator="gpu",
        devices=1,
        callbacks=[callback_class(flavor)()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), loader, val)
    steps = step_rows(agent)
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    gpu = gpu_rows(agent)
    assert [r["step"] for r in gpu] == [0, 1, 2, 3]
    for r in gpu:
        assert r["forward_gpu_us"] > 0 and r["backward_gpu_us"] > 0 and r["h2d_gpu_us"] > 0, r
        # the update of ~40k parameters is far lighter than 2 forwards of 12 matmuls of 2048^2 x 256
        assert 0 < r["optimizer_gpu_us"] < r["forward_gpu_us"], r
