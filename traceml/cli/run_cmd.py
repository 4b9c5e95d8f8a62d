"""``traceml run``: launch a training through torchrun with the live view and a recording.

Starts ONE aggregator process (``python -m traceml.aggregator``, node 0 only) in parallel with
torchrun, whose ranks run the script inside ``traceml.integrations.executor`` (the runtime
executor plus the Hugging Face / Lightning import hooks).  Configuration reaches
the ranks only through the ``TRACEML_*`` environment variables of :mod:`traceml.config`; the
run's token is generated here.  The training's stdout/stderr are kept in the run's directory
(``stdout.log`` / ``stderr.log``) and shown above the live view (forwarded to the aggregator on
its control channel, printed here directly when there is no terminal view or the aggregator is
gone).  Ctrl-C once forwards SIGINT to the training; twice kills it; the recording is closed
either way.  The command exits with the training's own exit code.
"""

from __future__ import annotations

import enum
import hashlib
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import typer
from typer.core import TyperCommand

from traceml import config
from traceml.aggregator.control import exit_line, output_line, parse_line
from traceml.cli.run_args import TORCHRUN_ARG, option_table
from traceml.cli.settings import say
from traceml.errors import ConfigError, OutputError, TracemlError
from traceml.outpaths import check_new_file

UI_CHOICES = ("terminal", "web", "none")
RunUi = enum.Enum("RunUi", {c: c for c in UI_CHOICES}, type=str)  # type: ignore[misc]
#: exit status of a usage error (every traceml command)
EXIT_USAGE = 2
#: the aggregator's port on node 0 of a multi-node Slurm job, unless --aggregator-port says otherwise
SLURM_AGGREGATOR_PORT = 29501
DEFAULT_RUNS_DIR = "traceml_runs"
#: torchrun, with each rank's own exit code as the launcher's exit code (plain torchrun exits 1
#: for any failed rank) and 128+N when it was stopped by signal N.
#: Also: torch's TCPStore server listens on every interface whatever address it is given; when
#: that address is a loopback one, the shim hands it a socket bound to that address only
#: (``master_listen_fd``).  That covers the static rendezvous's store, the c10d rendezvous's
#: (``--standalone``, or ``--rdzv-backend c10d`` with a loopback endpoint) and the store the
#: c10d rendezvous shares with the ranks (hosted on 127.0.0.1 when the endpoint is loopback),
#: so a single-node run listens on nothing but loopback (docs/security.md).  Non-loopback
#: addresses (multi-node) are left to torch.
TORCHRUN_SHIM = """\
import ipaddress, socket, sys
import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as _c10d
import torch.distributed.elastic.rendezvous.dynamic_rendezvous as _dynamic
import torch.distributed.elastic.rendezvous.registry as _registry
import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as _static
from torch.distributed import TCPStore as _TCPStore
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import main
def _loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
def _store(host_name, port, world_size=None, is_master=False, *args, **kwargs):
    # torch's store listens on every interface whatever host it is given: a store that hosts a
    # loopback address gets a socket bound there instead (a busy port fails as torch's own would)
    if is_master and kwargs.get("master_listen_fd") is None and _loopback(host_name):
        addr = "127.0.0.1" if host_name == "localhost" else host_name
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(512)
        except OSError:
            sock.close()
        else:
            port = sock.getsockname()[1]
            kwargs["master_listen_fd"] = sock.detach()
    return _TCPStore(host_name, port, world_size, is_master, *args, **kwargs)
_static.TCPStore = _store
_c10d.TCPStore = _store
_create_handler = _registry.create_handler
def _handler(store, backend, params):
    # a rendezvous on a loopback endpoint (--standalone is localhost:0) is one machine: the store
    # torch shares with the ranks is hosted on 127.0.0.1 too, not on this machine's name
    try:
        host = parse_rendezvous_endpoint(params.endpoint, default_port=0)[0]
    except ValueError:
        host = ""
    if params.local_addr is None and _loopback(host):
        params.local_addr = "127.0.0.1"
    return _create_handler(store, backend, params)
_registry.create_handler = _handler
_shared_server = _dynamic.DynamicRendezvousHandler._create_tcp_store_server
def _shared(self, master_addr, master_port):
    if not _loopback(master_addr):
        return _shared_server(self, master_addr, master_port)
    return _store(master_addr, master_port, is_master=True, multi_tenant=True)
_dynamic.DynamicRendezvousHandler._create_tcp_store_server = _shared
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
try:
    main(sys.argv[1:])
except ChildFailedError as exc:
    code = exc.get_first_failure()[1].exitcode
    sys.exit(128 - code if code < 0 else (code or 1))
except SignalException as exc:
    sys.exit(128 + int(exc.sigval))
"""
#: seconds the CLI waits for the aggregator to close the recording, beyond its own rank deadline
AGGREGATOR_CLOSE_GRACE_S = 30.0
#: seconds to wait for the output pipes to drain after torchrun exited (grandchildren may hold them)
PIPE_DRAIN_S = 2.0
#: most bytes of training output forwarded per control line
MAX_FORWARD_CHARS = 64 * 1024
FORWARD_QUEUE = 10_000
#: how often the CLI's wait loops look at signals and at the aggregator
POLL_S = 0.1
FINISH_TIMEOUT_S = 10.0


# --- the plan: every decision made before a process starts --------------------------------


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


def listen_for_ranks(plan: RunPlan) -> socket.socket:
    """Bind the aggregator's port here, before any process learns it (the aggregator inherits the
    socket): a port picked as free cannot be taken in between.  A picked port found busy is
    replaced by another free one (``plan.aggregator_port`` is updated); a given one is an error."""
    from traceml.transport import listening_socket

    host = plan.aggregator_host or "0.0.0.0"
    for port in (plan.aggregator_port, 0):
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            if port and plan.aggregator_port_picked:
                continue
            raise ConfigError(
                f"cannot listen for the ranks on {host}:{port} ({exc.strerror or exc});"
                " choose another --aggregator-port, or leave it out for a free one"
            ) from exc
        plan.aggregator_port = int(sock.getsockname()[1])
        return sock
    raise AssertionError("unreachable: port 0 either binds or raises")


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


# --- output: tee to the run's logs, show above the live view -------------------------------


class Forwarder:
    """Owns the aggregator's stdin: output lines and the exit line, in order, from one thread.

    ``forward`` never blocks: when the queue is full or the aggregator is gone the text is
    written to this process's own stdout/stderr instead.
    """

    def __init__(self, stdin: IO[bytes] | None, show_directly: bool) -> None:
        self._stdin = stdin
        self._direct = show_directly or stdin is None
        self._queue: queue.Queue[bytes | None] = queue.Queue(FORWARD_QUEUE)
        self._gone = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="traceml-forward", daemon=True)
        if stdin is not None:
            self._thread.start()

    @property
    def aggregator_gone(self) -> bool:
        return self._gone.is_set()

    def forward(self, stream: str, text: str) -> None:
        if not self._direct and not self._gone.is_set():
            for i in range(0, len(text), MAX_FORWARD_CHARS):
                try:
                    self._queue.put_nowait(output_line(stream, text[i : i + MAX_FORWARD_CHARS]))
                except queue.Full:
                    self.write_direct(stream, text[i:])
                    return
            return
        self.write_direct(stream, text)

    def write_direct(self, stream: str, text: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        with self._lock:
            try:
                out.write(text)
                out.flush()
            except (OSError, ValueError):
                pass

    def send_exit(self, exit_code: int | None, signal_name: str, duration_s: float) -> None:
        if self._stdin is None:
            return
        try:
            self._queue.put(exit_line(exit_code, signal_name, duration_s), timeout=5.0)
        except queue.Full:
            pass

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then close the aggregator's stdin (end of the control channel)."""
        if self._stdin is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        try:
            self._stdin.close()
        except OSError:
            pass

    def _run(self) -> None:
        assert self._stdin is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not self._gone.is_set():
                try:
                    self._stdin.write(item)
                    self._stdin.flush()
                    continue
                except (OSError, ValueError):
                    self._gone.set()
            # the aggregator is gone: show here what it was to show
            msg = parse_line(item)
            if msg is not None and msg["kind"] == "output":
                self.write_direct(msg["stream"], msg["text"])


class OutputPump:
    """Reads one of the training's pipes: appends to the log file, forwards to the view."""

    def __init__(
        self, pipe: IO[bytes], stream: str, log_path: Path | None, forwarder: Forwarder, line_mode: bool
    ) -> None:
        self._pipe = pipe
        self._stream = stream
        self._log_path = log_path
        self._forwarder = forwarder
        self._line_mode = line_mode
        self.bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"traceml-{stream}", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        fd = self._pipe.fileno()
        tail = b""
        log: IO[bytes] | None = None
        if self._log_path is not None:
            try:
                log = open(self._log_path, "wb")  # noqa: SIM115 - closed below
            except OSError as exc:
                self._forwarder.write_direct("stderr", f"traceml: cannot write {self._log_path}: {exc}\n")
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.bytes += len(chunk)
                if log is not None:
                    try:
                        log.write(chunk)
                        log.flush()
                    except OSError:
                        log = None
                if self._line_mode:
                    # the live view prints whole lines; keep an unfinished one for the next chunk
                    data = tail + chunk
                    cut = data.rfind(b"\n") + 1
                    if cut == 0 and len(data) < MAX_FORWARD_CHARS:
                        tail = data
                        continue
                    cut = cut or len(data)
                    tail = data[cut:]
                    chunk = data[:cut]
                self._forwarder.forward(self._stream, chunk.decode("utf-8", errors="replace"))
            if tail:
                self._forwarder.forward(self._stream, tail.decode("utf-8", errors="replace") + "\n")
        finally:
            if log is not None:
                log.close()
            try:
                self._pipe.close()
            except OSError:
                pass


# --- processes -------------------------------------------------------------------------------


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc`` and every process below it (torchrun's ranks have their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.Error:
        victims = []
    for p in victims:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class RunSupervisor:
    """Starts the aggregator and torchrun, relays signals, waits, returns the exit code."""

    def __init__(self, plan: RunPlan, env: Mapping[str, str] | None = None) -> None:
        self.plan = plan
        self.env = dict(os.environ if env is None else env)
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.training: subprocess.Popen[bytes] | None = None
        self.forwarder: Forwarder | None = None
        self._signals: list[int] = []
        self._handled = 0
        #: the signals received while the training ran (the first one sets the exit code)
        self.training_signals: list[int] = []
        self._gone_reported = False

    # -- signals -------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any = None) -> None:
        """The handler only records the signal: acting on it here could re-enter a lock the
        interrupted code holds.  The wait loops act on it within :data:`POLL_S`."""
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._handled < len(self._signals):
            signum = self._signals[self._handled]
            self._handled += 1
            training = self.training
            if training is None or training.poll() is not None:
                # the training is over: a signal now hurries the aggregator, which closes the file
                if self.aggregator is not None and self.aggregator.poll() is None:
                    self.aggregator.send_signal(signal.SIGTERM)
            elif self._handled == 1:
                self._say(f"{signal.Signals(signum).name}: stopping the training (again to kill it)")
                try:
                    training.send_signal(signum)
                except OSError:
                    pass
            else:
                self._say("killing the training; the recording is still closed")
                kill_tree(training)

    def _say(self, message: str) -> None:
        line = f"traceml: {message}\n"
        if self.forwarder is not None:
            self.forwarder.forward("stderr", line)
        else:
            sys.stderr.write(line)

    # -- the run ---------------------------------------------------------------------------------
    def start(self) -> None:
        plan = self.plan
        keep_logs = True
        try:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            keep_logs = False  # the aggregator reports the recording's own failure
            self._say(
                f"cannot create {plan.run_dir} ({exc.strerror or exc}): no stdout.log/stderr.log; the training runs anyway"
            )
        if plan.starts_aggregator:
            listener = listen_for_ranks(plan)
            try:
                self.aggregator = subprocess.Popen(
                    aggregator_command(plan, listener.fileno()),
                    stdin=subprocess.PIPE,
                    env=aggregator_env(plan, self.env),
                    start_new_session=True,
                    pass_fds=(listener.fileno(),),
                )
            finally:
                listener.close()  # the aggregator holds its own descriptor
        show_directly = plan.ui != "terminal" or self.aggregator is None
        self.forwarder = Forwarder(self.aggregator.stdin if self.aggregator else None, show_directly)
        self.training = subprocess.Popen(
            training_command(plan),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=rank_env(plan, self.env),
            start_new_session=True,
        )
        assert self.training.stdout is not None and self.training.stderr is not None
        line_mode = not show_directly
        self._pumps = [
            OutputPump(pipe, name, plan.run_dir / f"{name}.log" if keep_logs else None, self.forwarder, line_mode)
            for pipe, name in ((self.training.stdout, "stdout"), (self.training.stderr, "stderr"))
        ]

    def wait_training(self) -> int:
        assert self.training is not None
        while True:
            self._handle_signals()
            try:
                returncode = self.training.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                self._check_aggregator()
        # signals that came in while the training ran were meant for it: they are done with
        self.training_signals = list(self._signals)
        self._handled = len(self.training_signals)
        for pump in self._pumps:
            if not pump.join(PIPE_DRAIN_S):
                self._say("training output pipe still open after the training exited; not waiting for it")
        return returncode

    def _check_aggregator(self) -> None:
        agg = self.aggregator
        if agg is not None and not self._gone_reported and agg.poll() is not None:
            self._gone_reported = True
            self._say(
                f"the aggregator exited early (code {agg.returncode}); the training goes on without the live view "
                "and the recording keeps what was written"
            )

    def finish(self, returncode: int, duration_s: float) -> int:
        """Tell the aggregator, wait for it to close the recording, return the exit code."""
        code = _exit_code(returncode)
        signal_name = ""
        if self.training_signals:
            first = self.training_signals[0]
            signal_name = signal.Signals(first).name
            if code != 0:
                code = 128 + first
        assert self.forwarder is not None
        self.forwarder.send_exit(code, signal_name, duration_s)
        self.forwarder.close()
        agg = self.aggregator
        if agg is not None:
            deadline = time.monotonic() + self.plan.finish_timeout_s + AGGREGATOR_CLOSE_GRACE_S
            while agg.poll() is None and time.monotonic() < deadline:
                self._handle_signals()
                try:
                    agg.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    pass
            if agg.poll() is None:
                self._say("the aggregator did not close the recording in time; stopping it")
                agg.terminate()
                try:
                    agg.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    agg.kill()
                    agg.wait()
        return code

    def run(self) -> int:
        started = time.monotonic()
        self.start()
        returncode = self.wait_training()
        return self.finish(returncode, time.monotonic() - started)

    def abort(self) -> None:
        """Kill what was started (used when the CLI itself fails)."""
        for proc in (self.training, self.aggregator):
            if proc is not None and proc.poll() is None:
                kill_tree(proc)
                proc.wait()


def _describe_recording(plan: RunPlan) -> str:
    if plan.disabled:
        return "nothing recorded (--disable)"
    if plan.out is None:
        return "not recording (--no-record)" if plan.starts_aggregator else "streaming to node 0's aggregator"
    try:
        size = plan.out.stat().st_size
    except OSError:
        return f"recording {plan.out} is missing (see the messages above)"
    return f"recording: {plan.out} ({size} bytes)"


def run_plan(plan: RunPlan) -> int:
    """Run ``plan`` end to end with signal handling; returns the training's exit code."""
    target = plan.out if plan.out is not None else plan.run_dir
    where = "" if not plan.starts_aggregator else f" live view: {plan.ui};"
    if plan.renamed_from:
        print(
            f"traceml: {plan.run_dir.parent / plan.renamed_from} exists; this run is {plan.run_name}"
            " (nothing is overwritten)",
            file=sys.stderr,
            flush=True,
        )
    if plan.disabled:
        say(f"traceml: run {plan.run_name}; traceml is off (--disable): torchrun only, nothing recorded")
    else:
        say(f"traceml: run {plan.run_name};{where} writing {target}")
    sup = RunSupervisor(plan)
    # SIGHUP too: a closed terminal stops the training as it would stop plain torchrun
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in previous:
        signal.signal(s, sup.on_signal)
    try:
        code = sup.run()
    except BaseException:
        sup.abort()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    say(f"traceml: {_describe_recording(plan)}")
    return code


# --- the typer command -------------------------------------------------------------------------


class RunCommand(TyperCommand):
    """Reads the command line as torchrun would (see :mod:`traceml.cli.run_args`) before click
    does: torchrun's own options pass through, an unknown one is an error that names it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from traceml.cli.run_args import rewrite

        known = option_table(self.params)
        for name in ctx.help_option_names:
            known[name] = False
        try:
            rewritten = rewrite(args, known)
        except ConfigError as exc:
            typer.echo(f"traceml run: error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        for note in rewritten.notes:
            typer.echo(f"traceml run: {note}", err=True)
        return list(super().parse_args(ctx, rewritten.args))


def run_command(
    script: str = typer.Argument(..., help="the training script (or a module name with -m)"),
    script_args: list[str] | None = typer.Argument(None, help="arguments for the script, passed through untouched"),
    module: bool = typer.Option(False, "-m", "--module", help="SCRIPT is a module name, run as `python -m SCRIPT`"),
    nproc_per_node: str = typer.Option("1", "--nproc-per-node", help="ranks on this node: a number, auto, gpu or cpu"),
    nnodes: str | None = typer.Option(
        None, "--nnodes", help="nodes in the job, or MIN:MAX (elastic); default 1, or SLURM_NNODES under Slurm"
    ),
    node_rank: int | None = typer.Option(
        None, "--node-rank", help="this node's rank (node 0 runs the aggregator); Slurm: SLURM_NODEID"
    ),
    master_addr: str | None = typer.Option(
        None,
        "--master-addr",
        help="torchrun rendezvous address (default 127.0.0.1; Slurm: the job's first node)",
    ),
    master_port: int | None = typer.Option(None, "--master-port", help="default: a free port (29500 multi-node)"),
    ui: RunUi | None = typer.Option(None, "--ui", help="the live view (default: terminal on a TTY, else none)"),
    out: str | None = typer.Option(
        None, "--out", "-o", help="recording path (default traceml_runs/<run-name>/run.tml)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the --out recording if it exists"),
    run_name: str | None = typer.Option(None, "--run-name", help="default: <script>-<date>-<time>"),
    interval: float | None = typer.Option(
        None, "--interval", envvar="TRACEML_INTERVAL", help="seconds between samples (default 1.0)"
    ),
    aggregator_host: str | None = typer.Option(
        None, "--aggregator-host", help="aggregator address (node 0; default 127.0.0.1, Slurm multi-node: node 0)"
    ),
    aggregator_port: int | None = typer.Option(
        None, "--aggregator-port", help=f"default: a free port (Slurm multi-node: {SLURM_AGGREGATOR_PORT})"
    ),
    no_record: bool = typer.Option(False, "--no-record", help="live view only, no .tml file"),
    disable: bool = typer.Option(
        False, "--disable", envvar="TRACEML_DISABLED", help="run the script under torchrun with traceml off"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="after the run, print its summary (summary.json's content) to stdout as one JSON line"
    ),
    web_port: int = typer.Option(8050, "--web-port", help="port of the live dashboard (--ui web)"),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="TRACEML_TOKEN",
        help="shared secret for multi-node runs (default: random; TRACEML_TOKEN keeps it off the command line)",
    ),
    no_auto_integrations: bool = typer.Option(
        False,
        "--no-auto-integrations",
        envvar="TRACEML_NO_AUTO_INTEGRATIONS",
        help="do not attach traceml to Hugging Face / Lightning Trainers",
    ),
    no_auto_steps: bool = typer.Option(
        False,
        "--no-auto-steps",
        envvar="TRACEML_NO_AUTO_STEPS",
        help="do not cut a script without trace_step into steps at optimizer.step()",
    ),
    log_to: list[str] | None = typer.Option(
        None,
        "--log-to",
        help="after the run, log the summary, the verdict and the report files into wandb or mlflow"
        " (repeatable; docs/exports.md)",
    ),
    otlp: str | None = typer.Option(
        None,
        "--otlp",
        help="the aggregator sends the run's metrics to this OTLP/HTTP endpoint while it runs and at its end"
        " (e.g. http://localhost:4318; OTEL_EXPORTER_OTLP_* variables apply)",
    ),
    otlp_interval: float = typer.Option(15.0, "--otlp-interval", min=0.1, help="seconds between --otlp pushes"),
    torchrun_arg: list[str] | None = typer.Option(None, TORCHRUN_ARG, hidden=True),
) -> None:
    """Run SCRIPT on torchrun with the live view, recording every step of every rank.

    torchrun's own options (--standalone, --rdzv-backend/-endpoint/-id/-conf, --max-restarts,
    --monitor-interval, --start-method, --log-dir, --redirects, --tee, ...) go before SCRIPT and
    are passed to torchrun as given; underscores (--nproc_per_node=2) work as in torchrun.
    Under Slurm (SLURM_NODEID set) --nnodes, --node-rank and --master-addr default to the job's.
    """
    from traceml.cli.report_cmds import check_trackers
    from traceml.cli.run_args import parse_nnodes, resolve_nproc, slurm_defaults

    trackers = check_trackers(log_to, "run")
    try:
        if otlp is not None:
            from traceml.exports.otlp import metrics_endpoint

            metrics_endpoint(otlp)
        nproc = resolve_nproc(nproc_per_node)
        slurm = slurm_defaults(os.environ) if None in (nnodes, node_rank, master_addr) else None
        if slurm is not None:
            for note in slurm.notes:
                typer.echo(f"traceml run: {note}", err=True)
        low, high = parse_nnodes(nnodes if nnodes is not None else str(slurm.nnodes if slurm else 1))
        node = node_rank if node_rank is not None else (slurm.node_rank if slurm else 0)
        master = master_addr or (slurm.master_addr if slurm else "127.0.0.1")
        agg_host = aggregator_host or ("127.0.0.1" if not slurm or low == 1 else ("0.0.0.0" if node == 0 else master))
        agg_port = aggregator_port
        if agg_port is None and slurm is not None and low > 1:
            agg_port = SLURM_AGGREGATOR_PORT
        plan = plan_run(
            script,
            script_args or [],
            nproc_per_node=nproc,
            nnodes=low,
            node_rank=node,
            master_addr=master,
            master_port=master_port,
            ui=str(ui.value) if ui is not None else None,
            out=out,
            run_name=run_name,
            interval=interval,
            aggregator_host=agg_host,
            aggregator_port=agg_port,
            no_record=no_record or disable,
            web_port=web_port,
            token=token,
            auto_integrations=not no_auto_integrations,
            auto_steps=not no_auto_steps,
            stdout_is_tty=sys.stdout.isatty(),
            overwrite=overwrite,
            module=module,
            max_nnodes=high,
        )
    except (ConfigError, OutputError) as exc:
        typer.echo(f"traceml run: error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    plan.module = module
    plan.otlp = otlp
    plan.otlp_interval_s = otlp_interval
    plan.torchrun_args = list(torchrun_arg or [])
    plan.nnodes_spec = nnodes if nnodes is not None and ":" in nnodes else ""
    plan.disabled = disable
    plan.shadowing = shadowing_folders(script, module)
    for path in plan.shadowing:
        typer.echo(
            f"traceml run: note: {path} is named like the traceml package and would be imported instead of it"
            " in the ranks; traceml keeps the working folder off their import path (PYTHONSAFEPATH=1)."
            " Rename it, or start from another folder, if the script imports from it.",
            err=True,
        )
    if (trackers or otlp is not None) and (plan.out is None or not plan.starts_aggregator):
        typer.echo(
            "traceml run: error: --log-to / --otlp export the recording: not with --no-record, --disable,"
            " or on a node other than node 0",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    if as_json and plan.out is None:
        typer.echo(
            "traceml run: error: --json prints the recording's summary: not with --no-record or --disable", err=True
        )
        raise typer.Exit(EXIT_USAGE)
    code = run_plan(plan)
    if trackers:
        export_after_run(plan, trackers, None)  # --otlp: the aggregator sent the metrics
    if as_json and plan.out is not None and plan.starts_aggregator:
        print_summary_json(plan.out)
    raise typer.Exit(code)


def print_summary_json(recording: Path) -> None:
    """``run --json``: the run's summary as one line on stdout (the last line the command prints)."""
    import json

    from traceml._summary import load_nested

    try:
        summary = load_nested(recording)
    except TracemlError as exc:
        typer.echo(f"traceml run: error: no summary to print: {exc}", err=True)
        return
    typer.echo(json.dumps(summary, allow_nan=False, separators=(",", ":")))


def export_after_run(plan: RunPlan, trackers: list[str], otlp: str | None) -> bool:
    """``--log-to`` / ``--otlp``: from this process, once the aggregator closed the recording.
    A failure is reported, never turned into the training's exit code.  False if any failed."""
    from traceml._summary import load_nested
    from traceml.cli.report_cmds import log_summary

    assert plan.out is not None
    try:
        summary = load_nested(plan.out)
    except TracemlError as exc:
        typer.echo(f"traceml run: cannot export the run: {exc}", err=True)
        return False
    ok = True
    if otlp is not None:
        from traceml.exports.otlp import send_summary

        try:
            sent = send_summary(summary, endpoint=otlp)
            typer.echo(f"traceml: sent {sent.points} OTLP data points to {sent.endpoint}")
        except TracemlError as exc:
            typer.echo(f"traceml run: --otlp: {exc}", err=True)
            ok = False
    if trackers:
        files: list[Path] = []
        try:
            from replay.report import write_report

            written = write_report(plan.out, plan.run_dir / "report", overwrite=True)
            files = [written.html, written.summary_json, written.summary_md]
        except TracemlError as exc:
            typer.echo(f"traceml run: no report files to log ({exc}); logging the summary only", err=True)
        ok = log_summary(trackers, summary, files, run_name=plan.run_name) and ok
    return ok


def register(app: typer.Typer) -> None:
    """Add ``traceml run`` to *app*."""
    app.command(
        "run",
        cls=RunCommand,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(run_command)
