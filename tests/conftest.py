"""Shared fixtures.  The autouse ``no_leaks`` fixture fails any test that leaves a
thread, a socket, a child process or a traceml patch behind."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import pytest


def _traceml_patches() -> list[str]:
    mod = sys.modules.get("traceml.runtime.patches")
    if mod is None:
        return []
    return list(mod.active_patches())


def _sockets(proc: psutil.Process) -> set[tuple]:
    try:
        return {(c.laddr, c.raddr, c.status) for c in proc.net_connections(kind="inet")}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    proc = psutil.Process()
    threads_before = set(threading.enumerate())
    children_before = {c.pid for c in proc.children(recursive=True)}
    sockets_before = _sockets(proc)
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        leaked_children = [
            c
            for c in proc.children(recursive=True)
            if c.pid not in children_before and c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        ]
        leaked_sockets = {
            s
            for s in _sockets(proc) - sockets_before
            if s[2] not in ("TIME_WAIT", "CLOSE_WAIT", "FIN_WAIT2", "FIN_WAIT1", "LAST_ACK", "CLOSING")
        }
        patches = _traceml_patches()
        if not (leaked_threads or leaked_children or leaked_sockets or patches) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if leaked_threads:
        problems.append(f"threads: {[t.name for t in leaked_threads]}")
    if leaked_children:
        problems.append(f"child processes: {[c.pid for c in leaked_children]}")
        for c in leaked_children:
            c.kill()
    if leaked_sockets:
        problems.append(f"sockets: {sorted(map(str, leaked_sockets))}")
    if patches:
        problems.append(f"traceml patches still installed: {patches}")
    if problems:
        pytest.fail("test leaked " + "; ".join(problems))
