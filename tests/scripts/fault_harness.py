"""Process helpers shared by the fault and scale tests and benchmarks (no pytest imports).

``LiveRun`` starts ``traceml run`` in the background and reads its output line by line;
``find_aggregator`` finds the aggregator process under it; ``final_loss`` reads what
``fault_train.py`` prints; ``bare_run`` runs a script without traceml.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parents[1]
TRACEML = str(Path(sys.executable).parent / "traceml")
FAULT_TRAIN = str(SCRIPTS / "fault_train.py")
FAULT_STEPS = str(SCRIPTS / "fault_steps.py")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TRACEML_* and torchrun variables, plus ``extra``."""
    drop = ("TRACEML_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


class LiveRun:
    """``traceml run ARGS`` in the background; stdout and stderr are read line by line."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = [TRACEML, "run", *args]
        self.proc = subprocess.Popen(
            self.cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or clean_env()
        )
        self.started = time.monotonic()
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._seen = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[str], name: str) -> None:
        for line in pipe:
            with self._seen:
                self.lines[name].append(line)
                self._seen.notify_all()

    def wait_for(self, pattern: str, stream: str = "stdout", timeout: float = 120) -> re.Match[str]:
        """The first line matching ``pattern`` (a regex), waiting for it."""
        rx = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines[stream] if (m := rx.search(line))), None)

        with self._seen:
            self._seen.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout)
            match = found()
        if match is None:
            raise AssertionError(f"`{' '.join(self.cmd)}` never printed /{pattern}/ on {stream}: {self.lines}")
        return match

    def aggregator(self, timeout: float = 60) -> psutil.Process:
        return find_aggregator(self.proc.pid, timeout)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the run; kill everything under it if it does not end in time."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
                self.proc.wait()
            for reader in self._readers:
                reader.join(10)
        return code

    @property
    def out(self) -> str:
        return "".join(self.lines["stdout"])

    @property
    def err(self) -> str:
        return "".join(self.lines["stderr"])


def find_aggregator(pid: int, timeout: float = 60) -> psutil.Process:
    """The ``python -m traceml.aggregator`` process under ``pid``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    if "traceml.aggregator" in " ".join(child.cmdline()):
                        return child
                except psutil.Error:
                    continue
        except psutil.NoSuchProcess:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no aggregator process under pid {pid}")
        time.sleep(0.02)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        parent = psutil.Process(pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for p in victims:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def final_loss(text: str) -> float:
    found = re.findall(r"^final loss (\S+)$", text, flags=re.MULTILINE)
    if len(found) != 1:
        raise AssertionError(f"expected one 'final loss' line, found {len(found)} in:\n{text[-2000:]}")
    return float(found[0])


def bare_run(script: str, args: Sequence[str], cwd: Path) -> subprocess.Popen[str]:
    """The script with plain python and no traceml environment (started; call .communicate())."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


def inspect_text(path: Path) -> tuple[int, str]:
    """``traceml inspect PATH``: exit code and output."""
    res = subprocess.run(
        [TRACEML, "inspect", str(path)], capture_output=True, text=True, timeout=120, env=clean_env(COLUMNS="200")
    )
    return res.returncode, res.stdout + res.stderr
