"""Zero-code steps (``traceml.init(auto_steps=True)``, what ``traceml run`` does) and
``traceml.trace_input``, in-process on real torch modules and optimizers (no sender: the rows
are read from the agent's tables)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import traceml
from traceml.runtime import api, patches
from traceml.schema import STEP_TIME

COLS = list(STEP_TIME.names)
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("TRACEML_") or k in TORCHRUN_VARS:
            monkeypatch.delenv(k)
    torch.manual_seed(0)
    yield
    traceml.shutdown()


def rows(agent) -> dict[str, np.ndarray]:
    recent = agent.tables["step_time"].recent()
    return {c: np.array([r[i] for r in recent]) for i, c in enumerate(COLS)}


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def train(model, opt, iters: int, accum: int = 1, sleep_s: float = 0.0, loader=None) -> None:
    for _ in range(iters):
        for _ in range(accum):
            x = next(loader) if loader is not None else torch.randn(16, 32)
            model(x).square().mean().backward()
        if sleep_s:
            time.sleep(sleep_s)
        opt.step()
        opt.zero_grad()


def test_unmodified_loop_records_one_step_per_optimizer_step_with_its_phases():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 8, sleep_s=0.004)
    r = rows(agent)
    # the first iteration is recorded from its first training forward
    assert list(r["step"]) == list(range(8))
    assert (r["forward_us"] > 0).all() and (r["backward_us"] > 0).all() and (r["optimizer_us"] > 0).all()
    # the sleep before optimizer.step() is in the step, unnamed
    assert (r["residual_us"] >= 3000).all(), r["residual_us"]
    parts = r["dataloader_us"] + r["h2d_us"] + r["forward_us"] + r["backward_us"] + r["optimizer_us"] + r["residual_us"]
    assert (np.abs(parts - r["step_us"]) <= 6).all()
    assert agent.autostep.models == ["Sequential"]
    assert agent.environment()["step_source"] == "optimizer"


def test_gradient_accumulation_sums_into_one_step():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = {"n": 0}
    inner = model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return inner(*a, **k)

    model.forward = counting  # the auto-step wrapper goes on top of the user's own
    train(model, opt, 6, accum=4)
    r = rows(agent)
    assert len(r["step"]) == 6
    assert calls["n"] == 24
    single = traceml.init()
    assert single is agent


def test_evaluation_under_no_grad_is_not_step_work():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 3)
    with torch.no_grad():
        for _ in range(4):
            time.sleep(0.03)  # the evaluation loader
            model(torch.randn(8, 32))
    with torch.inference_mode():
        model(torch.randn(8, 32))
    train(model, opt, 3)
    r = rows(agent)
    assert len(r["step"]) == 6
    # 120 ms of evaluation (sleeps: unnamed time) before the 4th step's training work is in no step
    assert r["residual_us"].max() < 60_000, r["residual_us"]
    assert r["dataloader_us"].max() == 0


def test_first_iteration_is_a_whole_step_from_its_first_training_forward():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torch.no_grad():
        model(torch.randn(4, 32))  # an evaluation pass first: not the start
    time.sleep(0.3)  # before the first training forward: in no step
    train(model, opt, 3)
    r = rows(agent)
    assert list(r["step"]) == [0, 1, 2]
    assert (r["forward_us"] > 0).all() and (r["backward_us"] > 0).all() and (r["optimizer_us"] > 0).all()
    # the 300 ms sleep would be unnamed time of the first step had it started before its forward
    assert r["residual_us"][0] < 250_000, r["residual_us"]
    # the global forward hooks that found it are gone
    assert not [n for n in patches.active_patches() if "first forward" in n]


def test_a_step_gradscaler_skips_still_ends_at_its_update():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    skipped = []
    for i in range(6):
        loss = model(torch.randn(16, 32)).square().mean()
        scaler.scale(loss).backward()
        if i == 3:
            next(model.parameters()).grad.fill_(float("inf"))  # overflow: scaler.step skips opt.step()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        opt.zero_grad()
    assert skipped == [False, False, False, True, False, False]
    r = rows(agent)
    assert list(r["step"]) == list(range(6))  # six iterations, six steps: the skipped one is not merged
    assert r["optimizer_us"][3] == 0 and (np.delete(r["optimizer_us"], 3) > 0).all()
    assert (r["forward_us"] > 0).all() and (r["backward_us"] > 0).all()


def test_two_optimizers_make_one_step_per_iteration_gan_style():
    agent = traceml.init(auto_steps=True)
    gen = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    disc = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(6):
        real = torch.randn(16, 16)
        fake = gen(torch.randn(16, 8))
        loss_d = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(disc(fake), torch.ones(16, 1))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    r = rows(agent)
    # one per iteration; the first is not recorded (the loop holds two optimizers: it could end at the first)
    assert len(r["step"]) == 5
    assert sorted(agent.autostep.models) == ["Sequential", "Sequential"]
    assert (r["forward_us"] > 0).all() and (r["optimizer_us"] > 0).all()


def test_compiled_model_is_timed():
    agent = traceml.init(auto_steps=True)
    model = torch.compile(mlp(), backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 5)
    r = rows(agent)
    assert len(r["step"]) == 5 and (r["forward_us"] > 0).all()
    assert agent.autostep.models == ["OptimizedModule"]


def test_explicit_trace_step_wins_and_auto_steps_leave_no_patch():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 3)
    assert len(rows(agent)["step"]) == 3
    for _ in range(3):
        with traceml.trace_step(model):
            train(model, opt, 1)
    r = rows(agent)
    assert list(r["step"]) == [0, 1, 2, 3, 4, 5]  # the explicit steps follow; none is counted twice
    assert not agent.autostep.active
    assert not [n for n in patches.active_patches() if n.startswith("auto-step")]
    traceml.shutdown()
    assert patches.active_patches() == []


def test_off_by_environment_and_by_default_under_plain_init(monkeypatch):
    monkeypatch.setenv("TRACEML_NO_AUTO_STEPS", "1")
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 3)
    assert agent.autostep is None and agent.tables["step_time"].appended == 0
    traceml.shutdown()
    monkeypatch.delenv("TRACEML_NO_AUTO_STEPS")
    agent = traceml.init()
    train(model, opt, 3)
    assert agent.autostep is None and agent.tables["step_time"].appended == 0


def test_model_found_by_gc_when_no_frame_holds_it():
    agent = traceml.init(auto_steps=True)
    holder = {"m": mlp()}

    def make_opt():
        return torch.optim.SGD(holder["m"].parameters(), lr=0.01)

    opt = make_opt()

    def step_without_model_in_locals():
        opt.step()
        opt.zero_grad()

    for _ in range(4):
        holder["m"](torch.randn(4, 32)).sum().backward()
        step_without_model_in_locals()
    assert agent.autostep.models == ["Sequential"]
    assert (rows(agent)["forward_us"] > 0).all()


# --- trace_input ------------------------------------------------------------------------------


def test_trace_input_marks_get_batch_as_dataloader_inside_and_between_steps():
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(1000, 32)

    @traceml.trace_input
    def get_batch() -> torch.Tensor:
        time.sleep(0.01)
        i = int(torch.randint(0, 900, (1,)))
        return data[i : i + 16]

    x = get_batch()
    for _ in range(6):
        loss = model(x).square().mean()
        x = get_batch()  # prefetch inside the step, as nanoGPT does
        loss.backward()
        opt.step()
        opt.zero_grad()
    r = rows(agent)
    assert len(r["step"]) == 6  # the first get_batch() before the loop is the first step's input
    assert (r["dataloader_us"] >= 9500).all(), r["dataloader_us"]
    # the sleep is not residual (a loaded machine may still stretch one step's unnamed part)
    assert np.median(r["residual_us"]) < np.median(r["dataloader_us"]) / 2, r["residual_us"]


def test_trace_input_block_iterator_and_generator_forms():
    agent = traceml.init()
    model = mlp()

    def stream():
        for _ in range(3):
            time.sleep(0.002)
            yield torch.randn(4, 32)

    timed_gen = traceml.trace_input(stream)
    for x in timed_gen():
        with traceml.trace_step(model):
            model(x)
    for x in traceml.trace_input(stream()):
        with traceml.trace_step(model):
            model(x)
    for x in traceml.trace_input([torch.randn(4, 32)] * 2):
        with traceml.trace_step(model):
            with traceml.trace_input():
                time.sleep(0.002)
            model(x)
    r = rows(agent)
    assert len(r["step"]) == 8
    assert (r["dataloader_us"] >= 1500).all(), r["dataloader_us"]
    with pytest.raises(TypeError, match="expected a function, an iterator or an iterable"):
        traceml.trace_input(3)


def test_trace_input_is_a_pass_through_when_traceml_is_off(monkeypatch):
    monkeypatch.setenv("TRACEML_DISABLED", "1")
    assert traceml.init() is None

    @traceml.trace_input
    def get() -> int:
        return 7

    with traceml.trace_input():
        assert get() == 7
    assert list(traceml.trace_input(iter([1, 2]))) == [1, 2]
    assert api._agent is None


def test_an_auto_wrapped_model_pickles_and_copies_as_the_plain_model():
    import copy
    import pickle

    from traceml.runtime.autostep import AutoForward

    traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 2)
    assert isinstance(vars(model)["forward"], AutoForward)
    x = torch.randn(4, 32)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not isinstance(vars(clone).get("forward"), AutoForward)  # no traceml state travels
        assert torch.allclose(clone(x), model(x))


def test_the_steady_state_boundary_runs_in_c_with_the_same_rows(monkeypatch):
    from traceml.runtime import autostep, step

    if step.FAST is None:
        pytest.skip("the C fast path is not built (or TRACEML_PURE_PYTHON=1)")
    calls = {"pre": 0, "post": 0}
    pre, post = autostep.AutoSteps._pre, autostep.AutoSteps._post

    def counting_pre(self, *a):
        calls["pre"] += 1
        return pre(self, *a)

    def counting_post(self, *a):
        calls["post"] += 1
        return post(self, *a)

    monkeypatch.setattr(autostep.AutoSteps, "_pre", counting_pre)
    monkeypatch.setattr(autostep.AutoSteps, "_post", counting_post)
    agent = traceml.init(auto_steps=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 40)
    r = rows(agent)
    assert list(r["step"]) == list(range(40))  # one row per optimizer step, as in Python
    assert (r["forward_us"] > 0).all() and (r["optimizer_us"] > 0).all()
    assert agent.autostep.steps_recorded == 40 and agent.autostep.boundaries >= 40
    # the Python hooks ran for the first iterations only (finding the model and the closing optimizer)
    assert calls["pre"] <= 3 and calls["post"] <= 3, calls
