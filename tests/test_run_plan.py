"""``traceml run`` decisions before any process starts: paths, names, ports, token, commands,
environment, and the command line (SCRIPT_ARGS pass through untouched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from traceml import config
from traceml.cli import app, run_cmd, supervisor
from traceml.cli.launch_plan import RunPlan, aggregator_command, aggregator_env, plan_run, rank_env, training_command
from traceml.errors import ConfigError


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


def test_defaults_name_the_run_after_the_script_and_record_under_traceml_runs(script: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    plan = plan_run(script, runs_dir=str(runs), now=0)
    assert plan.run_name.startswith("train-") and plan.run_dir == runs / plan.run_name
    assert plan.out == plan.run_dir / "run.tml"
    assert plan.ui == "none" and plan.world_size == 1 and plan.starts_aggregator
    assert len(plan.token) == 32 and plan.aggregator_port > 0 and plan.master_port > 0
    # the same default name again gets a suffix instead of overwriting the first run
    plan.run_dir.mkdir(parents=True)
    again = plan_run(script, runs_dir=str(runs), now=0)
    assert again.run_name == plan.run_name + "-2"
    assert again.token != plan.token


def test_explicit_out_no_record_and_tty_default(script: str, tmp_path: Path) -> None:
    plan = plan_run(script, out=str(tmp_path / "x" / "r.tml"), stdout_is_tty=True)
    assert plan.out == tmp_path / "x" / "r.tml" and plan.run_dir == tmp_path / "x" and plan.run_name == "x"
    assert plan.ui == "terminal"
    live = plan_run(script, no_record=True, run_name="live", runs_dir=str(tmp_path))
    assert live.out is None and live.run_dir == tmp_path / "live"


def test_shared_token_gives_every_node_the_same_run_id(script: str) -> None:
    a = plan_run(script, nnodes=2, node_rank=0, token="t0k", aggregator_host="0.0.0.0", aggregator_port=29999)
    b = plan_run(script, nnodes=2, node_rank=1, token="t0k", aggregator_host="10.0.0.1", aggregator_port=29999)
    assert a.run_id == b.run_id and a.starts_aggregator and not b.starts_aggregator
    assert b.out is None and a.world_size == 2  # nproc 1 x nnodes 2
    assert a.connect_host == "127.0.0.1" and b.connect_host == "10.0.0.1"
    assert a.master_port == 29500


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nproc_per_node": 0}, "nproc-per-node"),
        ({"nnodes": 2, "node_rank": 2, "token": "t"}, "node-rank 2"),
        ({"ui": "gui"}, "--ui"),
        ({"interval": 0}, "--interval"),
        ({"nnodes": 2, "node_rank": 1, "aggregator_port": 1}, "--token"),
        ({"nnodes": 2}, "multi-node run needs one --token"),
    ],
)
def test_bad_options_say_what_to_change(script: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_run(script, **kwargs)


def test_missing_script() -> None:
    with pytest.raises(ConfigError, match="not found"):
        plan_run("no/such/train.py")


def plan_for(script: str, tmp_path: Path, **kwargs: Any) -> RunPlan:
    return plan_run(
        script,
        ["--lr", "0.1", "--", "-x"],
        nproc_per_node=2,
        interval=0.5,
        out=str(tmp_path / "o" / "run.tml"),
        aggregator_port=4242,
        master_port=4343,
        **kwargs,
    )


def test_commands_and_environment(script: str, tmp_path: Path) -> None:
    plan = plan_for(script, tmp_path)
    train = training_command(plan)
    assert train[1] == "-c" and "ChildFailedError" in train[2]
    assert "--nproc-per-node=2" in train and "--master-port=4343" in train
    assert train[-4:] == ["--lr", "0.1", "--", "-x"]
    assert train[-5] == script
    assert train[-7:-5] == ["-m", "traceml.integrations.executor"]
    agg = aggregator_command(plan)
    assert agg[1:3] == ["-m", "traceml.aggregator"] and "--control-stdin" in agg
    assert agg[agg.index("--expected-ranks") + 1] == "2" and agg[agg.index("--out") + 1] == str(plan.out)
    assert plan.token not in agg  # the token never goes on a command line
    env = rank_env(plan, {"PATH": "/bin", "TRACEML_OUT": "stale.tml", config.ENV_DISABLED: "0"})
    assert env[config.ENV_AGGREGATOR_PORT] == "4242" and env[config.ENV_TOKEN] == plan.token
    assert env[config.ENV_RUN_ID] == plan.run_id and env[config.ENV_INTERVAL] == "0.5"
    assert config.ENV_OUT not in env and env[config.ENV_DISABLED] == "0" and env["PATH"] == "/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert config.ENV_NO_AUTO_INTEGRATIONS not in env
    assert config.rank_config_from_env(env).auto_integrations
    off = rank_env(plan_for(script, tmp_path, auto_integrations=False), {})
    assert not config.rank_config_from_env(off).auto_integrations
    assert aggregator_env(plan, {"TRACEML_AGGREGATOR_PORT": "1"}) == {config.ENV_TOKEN: plan.token}
    # what a rank reads back is what the plan decided
    cfg = config.rank_config_from_env(env)
    assert (cfg.aggregator_port, cfg.token, cfg.run_id, cfg.interval_s, cfg.out) == (
        4242,
        plan.token,
        plan.run_id,
        0.5,
        None,
    )


def test_command_line_passes_script_args_untouched(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RunPlan] = []
    monkeypatch.setattr(run_cmd, "run_plan", lambda plan: seen.append(plan) or 7)
    result = CliRunner().invoke(
        app,
        ["run", "--nproc-per-node", "2", "--ui", "none", "--no-record", script, "--epochs", "3", "--ui", "web", "-v"],
    )
    assert result.exit_code == 7, result.output
    (plan,) = seen
    assert plan.script == script and plan.script_args == ["--epochs", "3", "--ui", "web", "-v"]
    assert plan.nproc_per_node == 2 and plan.ui == "none" and plan.out is None


def test_command_line_reports_bad_options(script: str) -> None:
    result = CliRunner().invoke(app, ["run", "--ui", "gui", script])
    assert result.exit_code == 2
    # a typed choice: click names the option and lists the choices (help and completion list them too)
    assert "Invalid value for '--ui'" in result.output and "'gui' is not one of" in result.output


def test_multi_node_token_can_come_from_the_environment(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RunPlan] = []
    monkeypatch.setattr(run_cmd, "run_plan", lambda plan: seen.append(plan) or 0)
    argv = ["run", "--nnodes", "2", "--node-rank", "1", "--aggregator-port", "5000", "--ui", "none", script]
    refused = CliRunner().invoke(app, argv, env={"TRACEML_TOKEN": ""})
    assert refused.exit_code == 2 and "--token" in refused.output
    result = CliRunner().invoke(app, argv, env={"TRACEML_TOKEN": "job-secret"})
    assert result.exit_code == 0, result.output
    assert seen[0].token == "job-secret"


def test_the_aggregator_port_is_bound_before_anyone_learns_it(script: str) -> None:
    import socket

    plan = plan_run(script)
    assert plan.aggregator_port_picked
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", plan.aggregator_port))  # another process took the picked port meanwhile
    squatter.listen(1)
    try:
        taken = plan.aggregator_port
        listener = supervisor.listen_for_ranks(plan)
        try:
            assert plan.aggregator_port != taken and listener.getsockname()[1] == plan.aggregator_port
            assert rank_env(plan, {})[config.ENV_AGGREGATOR_PORT] == str(plan.aggregator_port)
            cmd = aggregator_command(plan, listener.fileno())
            assert cmd[cmd.index("--listen-fd") + 1] == str(listener.fileno())
            assert "--listen-fd" not in aggregator_command(plan)
        finally:
            listener.close()
        given = plan_run(script, aggregator_port=taken)
        assert not given.aggregator_port_picked
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{taken} .*another --aggregator-port"):
            supervisor.listen_for_ranks(given)
    finally:
        squatter.close()


def test_the_plan_starts_nothing_and_the_supervisor_does_not_decide() -> None:
    """launch_plan.py is the pure plan (no process, pipe, thread or signal); the supervisor runs a
    plan and never imports the typer shell."""
    import ast
    from pathlib import Path

    def imports(module: str) -> set[str]:
        path = Path(__file__).resolve().parents[1] / "traceml" / "cli" / f"{module}.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        return found

    plan = imports("launch_plan")
    assert not plan & {"subprocess", "threading", "signal", "queue", "typer", "traceml.cli.supervisor"}, plan
    assert "traceml.cli.launch_plan" in imports("supervisor")
    assert not imports("supervisor") & {"typer", "traceml.cli.run_cmd"}
