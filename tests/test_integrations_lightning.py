"""Lightning integration, in process, for both ``lightning.pytorch`` and ``pytorch_lightning``:
a real Trainer fitting a tiny LightningModule on CPU, the real rank runtime
(``traceml.init(start=False)``) and its ``step_time`` rows.  training_step, backward, the
optimizer step and batch copies sleep for known times, so each phase has a floor that only
lands where it belongs (Lightning runs forward and backward inside ``optimizer.step(closure)``:
without the integration they would all read as optimizer time).

Trainer runs through ``traceml run`` are in test_integrations_run.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import traceml
from traceml.integrations import autohook
from traceml.runtime import api, patches
from traceml.schema import STEP_TIME

SCRIPT = Path(__file__).parent / "scripts" / "integ_lightning_train.py"
MS = 1000  # µs


def _flavors() -> list[Any]:
    out = []
    for flavor in ("lightning.pytorch", "pytorch_lightning"):
        top = flavor.split(".")[0]
        missing = importlib.util.find_spec(top) is None
        out.append(pytest.param(flavor, marks=pytest.mark.skipif(missing, reason=f"{top} not installed")))
    return out


FLAVORS = _flavors()


def _script() -> Any:
    mod = sys.modules.get("integ_lightning_train")
    if mod is None:
        spec = importlib.util.spec_from_file_location("integ_lightning_train", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["integ_lightning_train"] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    for name in ("TRACEML_AGGREGATOR_PORT", "TRACEML_AGGREGATOR_HOST", "TRACEML_OUT", "TRACEML_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRACEML_NO_AUTO_INTEGRATIONS", raising=False)
    monkeypatch.chdir(tmp_path)  # Lightning writes under the working directory
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


def fit(*argv: str) -> tuple[Any, dict[str, int]]:
    s = _script()
    trainer, module, train, val, counts = s.build(s.parse(list(argv)))
    trainer.fit(module, train, val)
    return trainer, counts


def check_phases(r: dict[str, int], micro: int) -> None:
    """The floors of one optimizer step over ``micro`` batches (script defaults: forward 4 ms,
    backward 3 ms, optimizer 2 ms, batch copy 3 ms)."""
    assert r["failed"] == 0
    assert r["forward_us"] >= micro * 4 * MS, r
    assert r["backward_us"] >= micro * 3 * MS, r
    assert r["optimizer_us"] >= 2 * MS, r
    assert r["h2d_us"] >= micro * 3 * MS, r
    phases = sum(r[f"{p}_us"] for p in ("dataloader", "h2d", "forward", "backward", "optimizer"))
    assert r["residual_us"] >= 0
    assert phases <= r["step_us"], r


@pytest.mark.parametrize("flavor", FLAVORS)
def test_one_step_per_optimizer_step_validation_excluded(agent: Any, flavor: str) -> None:
    # 8 batches, accumulate 2 -> 4 optimizer steps.  Validation (2 batches of 4 items taking 80 ms
    # each) runs as the sanity check, after batch 3 -- INSIDE the window of batches 3 and 4 -- and
    # after batch 6: were any of it counted, a step would hold >= 640 ms.
    trainer, counts = fit(
        "--flavor", flavor, "--callback", "--accum", "2", "--batches", "8", "--val-every", "3", "--val-sleep", "0.08"
    )
    assert counts["optimizer_steps"] == 4 and counts["batches"] == 8 and counts["validations"] == 3
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    val_us = 8 * 80 * MS
    for r in got:
        check_phases(r, micro=2)
        assert r["dataloader_us"] < val_us and r["step_us"] < val_us, r
    assert _script().traceml_callbacks(trainer) == ["TraceMLCallback"]
    assert not [n for n in patches.active_patches() if "traceml lightning" in n]  # strategy hooks restored
    assert "training_step" not in vars(trainer.strategy) and "batch_to_device" not in vars(trainer.strategy)


def test_manual_optimization(agent: Any) -> None:
    # the training_step runs backward and the optimizer itself: those phases are taken out of forward
    fit("--callback", "--manual", "--accum", "2", "--batches", "6", "--val-every", "0")
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2]
    for r in got:
        # backward and optimizer keep their floors although they ran inside training_step, and
        # the phases still sum to no more than the step: forward excludes them
        check_phases(r, micro=2)


def test_exception_records_the_failed_step(agent: Any) -> None:
    with pytest.raises(RuntimeError, match="boom in training_step 3"):
        fit("--callback", "--accum", "2", "--batches", "8", "--val-every", "0", "--fail-at", "3")
    got = rows(agent)
    assert [(r["step"], r["failed"]) for r in got] == [(0, 0), (1, 1)]
    check_phases(got[0], micro=2)
    assert not [n for n in patches.active_patches() if "traceml lightning" in n]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_auto_attach_once(agent: Any, flavor: str) -> None:
    from traceml.integrations.lightning import TraceMLLightningCallback, callback_class

    trainer_mod = importlib.import_module(f"{flavor}.trainer.trainer")
    original_init = trainer_mod.Trainer.__init__
    names = autohook.install(force=True)
    assert any(f"{flavor} Trainer.__init__" in n for n in names)

    s = _script()
    for explicit in (False, True):
        argv = ["--flavor", flavor, "--val-every", "0"] + (["--callback"] if explicit else [])
        trainer, *_ = s.build(s.parse(argv))
        cbs = [cb for cb in trainer.callbacks if isinstance(cb, TraceMLLightningCallback)]
        assert len(cbs) == 1 and isinstance(cbs[0], callback_class(flavor)), trainer.callbacks

    fit("--flavor", flavor, "--accum", "2", "--batches", "4", "--val-every", "0")
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1]
    for r in got:
        check_phases(r, micro=2)

    autohook.uninstall()
    assert trainer_mod.Trainer.__init__ is original_init
    assert not [n for n in patches.active_patches() if autohook.TAG in n]


def test_callback_class_follows_the_imported_package() -> None:
    from traceml.integrations import lightning

    cls = lightning.TraceMLCallback
    assert cls is lightning.callback_class()
    base = importlib.import_module(cls.traceml_flavor).Callback
    assert issubclass(cls, base) and issubclass(cls, lightning.TraceMLLightningCallback)


def test_example_is_traced_with_no_code_change(agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # what `traceml run examples/lightning_train.py` does inside the rank: hooks installed, script run as __main__
    import runpy

    example = Path(__file__).parent.parent / "examples" / "lightning_train.py"
    autohook.install(force=True)
    argv = [str(example), "--epochs", "1", "--samples", "256", "--batch-size", "32", "--accum", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(example), run_name="__main__")
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2, 3]  # 8 batches, accumulate 2
    assert all(r["forward_us"] > 0 and r["backward_us"] > 0 and r["optimizer_us"] > 0 for r in got), got


def test_a_broken_integration_never_reaches_training(
    agent: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from traceml.integrations import _bridge

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("integration bug")

    monkeypatch.setattr(_bridge, "_recycle_gpu_pairs", broken)  # fails at train start
    with caplog.at_level("WARNING", logger="traceml.runtime"):
        trainer, counts = fit("--callback", "--accum", "2", "--batches", "4", "--val-every", "0")
    assert counts["optimizer_steps"] == 2  # training ran to the end
    assert rows(agent) == []  # the integration turned itself off ...
    assert any("lightning integration" in r.getMessage() for r in caplog.records)  # ... and said so once
    assert agent.tracker.depth == 0 and not [n for n in patches.active_patches() if "traceml lightning" in n]
