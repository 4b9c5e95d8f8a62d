"""The processes of a ``traceml run``: binds the ranks' port, starts the aggregator and torchrun
from a :class:`~traceml.cli.launch_plan.RunPlan`, tees the training's output to the run's logs
and the live view, relays signals (once stops, twice kills) and returns the training's exit code.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from traceml.aggregator.control import exit_line, output_line, parse_line
from traceml.cli.launch_plan import RunPlan, aggregator_command, aggregator_env, rank_env, training_command
from traceml.cli.settings import say
from traceml.errors import ConfigError

#: seconds the CLI waits for the aggregator to close the recording, beyond its own rank deadline
AGGREGATOR_CLOSE_GRACE_S = 30.0
#: seconds to wait for the output pipes to drain after torchrun exited (grandchildren may hold them)
PIPE_DRAIN_S = 2.0
#: most bytes of training output forwarded per control line
MAX_FORWARD_CHARS = 64 * 1024
FORWARD_QUEUE = 10_000
#: how often the CLI's wait loops look at signals and at the aggregator
POLL_S = 0.1


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
