"""traceml's cost report reads the CPU time of its own threads (sender, sampler, stacks).  One of
them may have ended (a piece turned off by fail-open); reading an ended thread's clock through
``time.pthread_getcpuclockid(thread.ident)`` makes glibc read a freed descriptor, a segfault of the
training process once that thread's stack is unmapped (CI saw a rank die with -11)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from traceml.runtime.agent import thread_cpu_ns

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-thread CPU clocks are Linux's")

#: an ended thread, then thread churn with large stacks so that glibc's stack cache is trimmed
#: (the ended thread's descriptor unmapped), then the cost report's read of traceml's threads
SCRIPT = textwrap.dedent(
    """
    import faulthandler, sys, threading, time, types
    faulthandler.enable()
    sys.path.insert(0, {root!r})
    from traceml.runtime.agent import Agent

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    live = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    live.start()
    threading.stack_size(64 * 1024 * 1024)
    for _ in range(20):
        churn = [threading.Thread(target=time.sleep, args=(0.01,)) for _ in range(4)]
        [t.start() for t in churn]
        [t.join() for t in churn]
    fake = types.SimpleNamespace(
        sender=types.SimpleNamespace(_thread=ended),
        sampler=types.SimpleNamespace(_thread=live),
        stacks=types.SimpleNamespace(_thread=None, native_ns=7),
        _thread_cpu={{}},
    )
    print(Agent._threads_cpu_ns(fake), sorted(fake._thread_cpu) == [live.native_id])
    """
)


def test_an_ended_thread_is_never_read_and_the_training_process_lives(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    total, only_live = out.stdout.split()
    assert int(total) >= 7 and only_live == "True", out.stdout


def test_thread_cpu_ns_follows_a_busy_thread_and_says_minus_one_once_it_ended() -> None:
    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:
        end = time.thread_time_ns() + 30_000_000
        while time.thread_time_ns() < end:
            pass
        burnt.set()
        release.wait(10)

    t = threading.Thread(target=burn)
    t.start()
    assert t.native_id is not None and burnt.wait(10)
    assert thread_cpu_ns(t.native_id) >= 30_000_000  # the clock the thread read itself
    release.set()
    t.join()
    # ended: EINVAL from the kernel, never a read of freed memory (join() returns a moment before
    # the kernel thread is gone)
    deadline = time.monotonic() + 10
    while thread_cpu_ns(t.native_id) != -1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert thread_cpu_ns(t.native_id) == -1
    main = threading.main_thread().native_id
    assert main is not None and threading.current_thread() is threading.main_thread()
    assert abs(thread_cpu_ns(main) - time.thread_time_ns()) < 50_000_000
