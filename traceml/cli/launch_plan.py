"""The plan of a ``traceml run``: options in, names, paths, ports, the token, the torchrun and
aggregator command lines and their environments out.  Pure apart from probing for free ports
and files: no process is started here (:mod:`traceml.cli.supervisor` starts them).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traceml import config
from traceml._summary import DEFAULT_RUNS_DIR
from traceml.cli.torchrun_shim import TORCHRUN_SHIM
from traceml.errors import ConfigError
from traceml.outpaths import check_new_file

UI_CHOICES = ("terminal", "web", "none")
#: seconds the aggregator waits for ranks to finish after the training exited
FINISH_TIMEOUT_S = 10.0


@dataclass
class RunPlan:
    script: str
    script_args: list[str]
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    ui: str
    out: Path | None
    run_dir: Path
    run_name: str
    run_id: str
    token: str
    interval: float | None
    aggregator_host: str
    aggregator_port: int
    web_port: int
    auto_integrations: bool = True
    auto_steps: bool = True
    #: the aggregator port was picked here (not given): another free one may replace it at start
    aggregator_port_picked: bool = False
    #: the --run-name asked for, when its folder existed and ``run_name`` got a numbered suffix
    renamed_from: str = ""
    #: SCRIPT is a module name (``traceml run -m pkg.train``)
    module: bool = False
    #: torchrun's own options, passed through as given (``--standalone``, ``--rdzv-*``, ...)
    torchrun_args: list[str] = field(default_factory=list)
    #: ``--nnodes`` as torchrun spells it (``1:4`` elastic); ``nnodes`` is its minimum
    nnodes_spec: str = ""
    #: ``--disable``: the script runs under torchrun with traceml off (no aggregator, no recording)
    disabled: bool = False
    #: ``--otlp``: the aggregator sends the run's metrics there while it runs and at its end
    otlp: str | None = None
    otlp_interval_s: float = 15.0
    #: folders named like the package that would shadow it on the ranks' import path
    shadowing: list[Path] = field(default_factory=list)
    python: str = sys.executable
    finish_timeout_s: float = FINISH_TIMEOUT_S
    start_ns: int = field(default_factory=time.time_ns)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def starts_aggregator(self) -> bool:
        return self.node_rank == 0 and not self.disabled

    @property
    def connect_host(self) -> str:
        """Where this node's ranks reach the aggregator (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.aggregator_host in ("0.0.0.0", "", "::") else self.aggregator_host


def free_port(host: str = "127.0.0.1") -> int:
    bind = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def _unique_run_name(base: str, runs_dir: Path) -> str:
    name, n = base, 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def plan_run(
    script: str,
    script_args: Sequence[str] = (),
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    ui: str | None = None,
    out: str | None = None,
    run_name: str | None = None,
    interval: float | None = None,
    aggregator_host: str = "127.0.0.1",
    aggregator_port: int | None = None,
    no_record: bool = False,
    web_port: int = 8050,
    token: str | None = None,
    auto_integrations: bool = True,
    auto_steps: bool = True,
    stdout_is_tty: bool = False,
    runs_dir: str = DEFAULT_RUNS_DIR,
    now: float | None = None,
    overwrite: bool = False,
    module: bool = False,
    max_nnodes: int | None = None,
) -> RunPlan:
    """Check the options and decide names, paths, ports and the token.

    Raises ConfigError, or OutputExistsError when ``out`` exists and ``overwrite`` is not set.
    An explicit ``run_name`` whose folder exists gets a numbered suffix (``renamed_from`` says so).
    """
    if module:
        check_module(script)
    elif not Path(script).is_file():
        hint = f" (a module? traceml run -m {script})" if re.fullmatch(r"[A-Za-z_][\w.]*", script) else ""
        raise ConfigError(f"script {script!r} not found; expected the path of a Python training script{hint}")
    if nproc_per_node < 1 or nnodes < 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node} --nnodes {nnodes}: expected both >= 1")
    top = max(nnodes, max_nnodes or nnodes)
    if not 0 <= node_rank < top:
        raise ConfigError(f"--node-rank {node_rank}: expected 0..{top - 1} for --nnodes {nnodes}")
    ui = ui or ("terminal" if stdout_is_tty else "none")
    if ui not in UI_CHOICES:
        raise ConfigError(f"--ui {ui!r}: expected one of {', '.join(UI_CHOICES)}")
    if interval is not None and interval <= 0:
        raise ConfigError(f"--interval {interval}: expected a positive number of seconds")
    if node_rank > 0 and (not token or aggregator_port is None):
        raise ConfigError(
            f"--node-rank {node_rank} streams to node 0's aggregator: give the same --token as node 0 and "
            "--aggregator-host/--aggregator-port of node 0"
        )
    if nnodes > 1 and node_rank == 0 and not token:
        raise ConfigError(
            "a multi-node run needs one --token shared by every node (e.g. --token $(openssl rand -hex 16)); "
            "give the same --token, --aggregator-host and --aggregator-port to each node's `traceml run`"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    runs = Path(runs_dir)
    if out is not None and not no_record:
        out_path: Path | None = Path(out)
        assert out_path is not None
        name = run_name or out_path.parent.name or Path(script).stem
        run_dir = out_path.parent
        if node_rank == 0:
            check_new_file(out_path, overwrite=overwrite, option="--out")
        renamed_from = ""
    else:
        name = _unique_run_name(run_name or f"{Path(script).stem}-{stamp}", runs)
        renamed_from = run_name if run_name and name != run_name else ""
        run_dir = runs / name
        out_path = None if no_record else run_dir / "run.tml"
    if node_rank > 0:
        out_path = None  # node 0 records every rank
    token = token or secrets.token_hex(16)
    # every node derives the same run id from the shared token: node 0's aggregator checks it
    run_id = hashlib.sha256(token.encode()).hexdigest()[:16]
    picked = aggregator_port is None
    if aggregator_port is None:
        aggregator_port = free_port(aggregator_host)
    if master_port is None:
        master_port = 29500
        if nnodes == 1:
            master_port = free_port(master_addr)
            while master_port == aggregator_port:
                master_port = free_port(master_addr)
    return RunPlan(
        script=script,
        script_args=list(script_args),
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        ui=ui,
        out=out_path,
        run_dir=run_dir,
        run_name=name,
        run_id=run_id,
        token=token,
        interval=interval,
        aggregator_host=aggregator_host,
        aggregator_port=aggregator_port,
        web_port=web_port,
        auto_integrations=auto_integrations,
        auto_steps=auto_steps,
        aggregator_port_picked=picked,
        renamed_from=renamed_from,
    )


def training_command(plan: RunPlan) -> list[str]:
    cmd = [
        plan.python,
        "-c",
        TORCHRUN_SHIM,
        f"--nproc-per-node={plan.nproc_per_node}",
        f"--nnodes={plan.nnodes_spec or plan.nnodes}",
        f"--node-rank={plan.node_rank}",
        f"--master-addr={plan.master_addr}",
        f"--master-port={plan.master_port}",
        *plan.torchrun_args,
    ]
    if plan.module:
        return [*cmd, "-m", "traceml.integrations.executor", "-m", plan.script, *plan.script_args]
    # the integrations' executor is the runtime executor plus the Trainer import hooks
    return [*cmd, "-m", "traceml.integrations.executor", plan.script, *plan.script_args]


def aggregator_command(plan: RunPlan, listen_fd: int | None = None) -> list[str]:
    cmd = [
        plan.python,
        "-m",
        "traceml.aggregator",
        "--host",
        plan.aggregator_host,
        "--port",
        str(plan.aggregator_port),
        "--run-id",
        plan.run_id,
        "--run-name",
        plan.run_name,
        "--ui",
        plan.ui,
        "--web-port",
        str(plan.web_port),
        "--expected-ranks",
        str(plan.world_size),
        "--nnodes",
        str(plan.nnodes),
        "--finish-timeout",
        str(plan.finish_timeout_s),
        "--start-ns",
        str(plan.start_ns),
        "--control-stdin",
    ]
    if listen_fd is not None:
        cmd += ["--listen-fd", str(listen_fd)]
    if plan.out is not None:
        cmd += ["--out", str(plan.out)]
    if plan.otlp is not None:
        cmd += ["--otlp", plan.otlp, "--otlp-interval", str(plan.otlp_interval_s)]
    return cmd + ["--command", plan.script, *plan.script_args]


def check_module(name: str) -> None:
    """``-m NAME``: a dotted module name whose top package is importable from here (nothing is imported)."""
    import importlib.machinery

    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
        raise ConfigError(f"-m {name!r}: expected a dotted module name like pkg.train")
    top = name.split(".")[0]
    if importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is None:
        raise ConfigError(
            f"-m {name}: no module {top!r} in the working folder or on sys.path; check the name and folder"
        )


def shadowing_folders(script: str, module: bool, package_dir: Path | None = None) -> list[Path]:
    """Folders or files named ``traceml`` in the working folder or the script's folder that are not
    this package: on the ranks' import path they would be imported instead of it."""
    import traceml

    real = (package_dir or Path(traceml.__file__).parent).resolve()
    dirs = [Path.cwd()] + ([] if module else [Path(script).resolve().parent])
    found: list[Path] = []
    for d in dict.fromkeys(dirs):
        for candidate in (d / "traceml", d / "traceml.py"):
            try:
                if candidate.exists() and candidate.resolve() != real and candidate not in found:
                    found.append(candidate)
            except OSError:
                continue
    return found


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), if any."""
    import psutil

    try:
        interfaces = psutil.net_if_addrs()
    except (OSError, psutil.Error):
        return None
    for name, addrs in sorted(interfaces.items()):
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return None


def rank_env(plan: RunPlan, base: Mapping[str, str]) -> dict[str, str]:
    """The ranks' environment: the caller's, plus the TRACEML_* variables of this run."""
    env = {k: v for k, v in base.items() if not k.startswith("TRACEML_")}
    env[config.ENV_AGGREGATOR_HOST] = plan.connect_host
    env[config.ENV_AGGREGATOR_PORT] = str(plan.aggregator_port)
    env[config.ENV_TOKEN] = plan.token
    env[config.ENV_RUN_ID] = plan.run_id
    if plan.interval is not None:
        env[config.ENV_INTERVAL] = str(plan.interval)
    for name in (
        config.ENV_DISABLED,
        config.ENV_NO_AUTO_INTEGRATIONS,
        config.ENV_NO_AUTO_STEPS,
        config.ENV_STACK_HZ,
        config.ENV_MAX_FRAME_MB,
    ):
        if name in base:
            env[name] = base[name]
    if not plan.auto_integrations:
        env[config.ENV_NO_AUTO_INTEGRATIONS] = "1"
    if plan.nnodes == 1 and not plan.nnodes_spec:
        # one node: gloo's listeners stay on loopback unless the user chose an interface
        # (docs/security.md; NCCL's bootstrap is left to NCCL_SOCKET_IFNAME, untested here on GPUs)
        lo = loopback_interface()
        if lo is not None:
            env.setdefault("GLOO_SOCKET_IFNAME", lo)
    if not plan.auto_steps:
        env[config.ENV_NO_AUTO_STEPS] = "1"
    if plan.disabled:
        env[config.ENV_DISABLED] = "1"
    if plan.shadowing:
        # `python -m` puts the working folder first on sys.path; a folder there named traceml would be
        # imported instead of the package (Python 3.11+ reads this variable)
        env["PYTHONSAFEPATH"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")  # output through our pipes shows up as it is printed
    return env


def aggregator_env(plan: RunPlan, base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith("TRACEML_")}
    env[config.ENV_TOKEN] = plan.token
    if config.ENV_MAX_FRAME_MB in base:
        env[config.ENV_MAX_FRAME_MB] = base[config.ENV_MAX_FRAME_MB]
    return env
