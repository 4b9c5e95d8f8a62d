"""Hugging Face Trainer integration, in process: a real ``transformers.Trainer`` training a tiny
model on CPU, the real rank runtime (``traceml.init(start=False)``: tables, patches, no threads)
and its ``step_time`` rows.  The model's forward, backward, optimizer step and batch copies
sleep for known times, so each phase has a floor that only lands where it belongs.

Trainer runs through ``traceml run`` are in test_integrations_run.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import traceml
from traceml.integrations import autohook
from traceml.runtime import api, patches
from traceml.schema import STEP_TIME

SCRIPT = Path(__file__).parent / "scripts" / "integ_hf_train.py"
MS = 1000  # µs


def _script() -> Any:
    mod = sys.modules.get("integ_hf_train")
    if mod is None:
        spec = importlib.util.spec_from_file_location("integ_hf_train", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["integ_hf_train"] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in ("TRACEML_AGGREGATOR_PORT", "TRACEML_AGGREGATOR_HOST", "TRACEML_OUT", "TRACEML_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRACEML_NO_AUTO_INTEGRATIONS", raising=False)
    a = api.init(start=False)
    assert a is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, above all on a shared machine
    try:
        yield a
    finally:
        torch.set_num_threads(threads)
    autohook.uninstall()
    traceml.shutdown()


def rows(agent: Any) -> list[dict[str, int]]:
    return [dict(zip(STEP_TIME.names, r, strict=True)) for r in agent.tables["step_time"].recent()]


def train(tmp_path: Path, *argv: str) -> tuple[Any, list[int]]:
    s = _script()
    trainer, evaluations = s.build(s.parse([*argv, "--out-dir", str(tmp_path / "hf_out")]))
    trainer.train()
    return trainer, evaluations


def check_phases(r: dict[str, int], micro: int, fwd_ms: float, bwd_ms: float, opt_ms: float, copy_ms: float) -> None:
    """The floors the script's sleeps put under each phase of one optimizer step of ``micro`` batches."""
    assert r["failed"] == 0
    assert r["forward_us"] >= micro * fwd_ms * MS, r
    assert r["backward_us"] >= micro * bwd_ms * MS, r
    assert r["optimizer_us"] >= opt_ms * MS, r
    assert r["h2d_us"] >= micro * copy_ms * MS, r  # Accelerate moved the batches before the step (#276)
    phases = sum(r[f"{p}_us"] for p in ("dataloader", "h2d", "forward", "backward", "optimizer"))
    assert r["residual_us"] >= 0
    assert phases <= r["step_us"], r


def test_callback_traces_each_optimizer_step_with_accumulation_and_no_evaluation(agent: Any, tmp_path: Path) -> None:
    # 3 optimizer steps of 3 micro-batches each, an evaluation after every step whose 8 items take
    # 60 ms each to fetch: were it counted, a step would hold >= 480 ms of dataloader wait (#451)
    trainer, evaluations = train(
        tmp_path, "--mode", "callback", "--accum", "3", "--steps", "3", "--eval-every", "1", "--eval-sleep", "0.06"
    )
    assert trainer.state.global_step == 3 and evaluations == [1, 2, 3]
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2]
    eval_fetch_us = 8 * 60 * MS
    for r in got:
        check_phases(r, micro=3, fwd_ms=4, bwd_ms=3, opt_ms=2, copy_ms=3)
        assert r["dataloader_us"] < eval_fetch_us and r["step_us"] < eval_fetch_us, r
    assert _script().traceml_callbacks(trainer) == ["TraceMLCallback"]
    # the batch-copy timing is the integration's own patch, undone when training ended
    assert not [n for n in patches.active_patches() if "send_to_device" in n]


def test_traceml_trainer_records_the_failed_step_and_reraises(agent: Any, tmp_path: Path) -> None:
    # micro-batches 0..3 make steps 0 and 1; the forward of micro-batch 5 raises inside step 2
    with pytest.raises(RuntimeError, match="boom in training forward 5"):
        train(tmp_path, "--mode", "trainer", "--accum", "2", "--steps", "4", "--eval-every", "0", "--fail-at", "5")
    got = rows(agent)
    assert [(r["step"], r["failed"]) for r in got] == [(0, 0), (1, 0), (2, 1)]
    check_phases(got[0], micro=2, fwd_ms=4, bwd_ms=3, opt_ms=2, copy_ms=3)


def test_auto_attach_plain_trainer_once(agent: Any, tmp_path: Path) -> None:
    import transformers.trainer as hf_trainer

    from traceml.integrations.huggingface import TraceMLCallback

    original_init = hf_trainer.Trainer.__init__
    original_train = hf_trainer.Trainer.train
    names = autohook.install(force=True)  # transformers is imported already: patched at once
    assert any("Trainer.__init__" in n for n in names) and any("Trainer.train" in n for n in names)
    assert hf_trainer.Trainer.__init__ is not original_init

    s = _script()
    for mode in ("plain", "callback", "trainer"):  # nothing, the user's own callback, TraceMLTrainer
        trainer, _ = s.build(s.parse(["--mode", mode, "--out-dir", str(tmp_path / mode)]))
        cbs = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TraceMLCallback)]
        assert len(cbs) == 1, (mode, trainer.callback_handler.callbacks)

    trainer, _ = train(tmp_path, "--mode", "plain", "--accum", "2", "--steps", "2", "--eval-every", "1")
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1]
    for r in got:
        check_phases(r, micro=2, fwd_ms=4, bwd_ms=3, opt_ms=2, copy_ms=3)

    # the patched Trainer.train records the step an exception cut short
    with pytest.raises(RuntimeError, match="boom in training forward 2"):
        train(tmp_path, "--mode", "plain", "--accum", "2", "--steps", "3", "--eval-every", "0", "--fail-at", "2")
    assert [(r["step"], r["failed"]) for r in rows(agent)][2:] == [(2, 0), (3, 1)]

    autohook.uninstall()
    assert hf_trainer.Trainer.__init__ is original_init and hf_trainer.Trainer.train is original_train
    assert not [n for n in patches.active_patches() if autohook.TAG in n]


def test_stopping_inside_an_accumulation_window_drops_the_window(agent: Any, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class StopMidWindow(TrainerCallback):  # type: ignore[misc]
        def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:  # first micro-batch of the second optimizer step
                control.should_training_stop = True

    s = _script()
    trainer, _ = s.build(
        s.parse(
            [
                "--mode",
                "callback",
                "--accum",
                "2",
                "--steps",
                "3",
                "--eval-every",
                "0",
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
    )
    trainer.add_callback(StopMidWindow())
    trainer.train()
    assert trainer.state.global_step == 1
    assert [(r["step"], r["failed"]) for r in rows(agent)] == [(0, 0)]


def test_shutdown_undoes_the_auto_integration(agent: Any) -> None:
    import transformers.trainer as hf_trainer

    original_init = hf_trainer.Trainer.__init__
    assert autohook.install(force=True)
    assert [n for n in patches.active_patches() if autohook.TAG in n]
    traceml.shutdown()
    assert hf_trainer.Trainer.__init__ is original_init
    assert patches.active_patches() == []
    assert autohook.installed() == []
    # a fresh agent can have them again
    assert api.init(start=False) is not None
    assert autohook.install(force=True) and hf_trainer.Trainer.__init__ is not original_init


def test_flag_turns_auto_integrations_off(agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEML_NO_AUTO_INTEGRATIONS", "1")
    assert not autohook.enabled()
    assert autohook.install() == []
    assert not [n for n in patches.active_patches() if autohook.TAG in n]


def test_disabled_traceml_leaves_training_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEML_DISABLED", "1")
    for name in ("TRACEML_AGGREGATOR_PORT", "TRACEML_OUT"):
        monkeypatch.delenv(name, raising=False)
    try:
        trainer, _ = train(tmp_path, "--mode", "trainer", "--accum", "2", "--steps", "2", "--eval-every", "1")
        assert trainer.state.global_step == 2
        assert api._agent is None and patches.active_patches() == []
    finally:
        traceml.shutdown()


def test_example_is_traced_with_no_code_change(agent: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what `traceml run examples/hf_trainer.py` does inside the rank: hooks installed, script run as __main__
    import runpy

    example = Path(__file__).parent.parent / "examples" / "hf_trainer.py"
    autohook.install(force=True)
    argv = [str(example), "--steps", "3", "--accum", "2", "--eval-every", "2", "--out-dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(example), run_name="__main__")
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2]
    assert all(r["forward_us"] > 0 and r["backward_us"] > 0 and r["optimizer_us"] > 0 for r in got), got
