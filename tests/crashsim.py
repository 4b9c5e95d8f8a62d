"""Power loss, simulated: a crash shim around the ``TmlWriter``'s file (after SQLite's crash VFS).

:class:`CrashLog` stands in for the ``os`` module inside ``traceml.format.writer``: every call
goes to the real ``os``, and the writes and ``fdatasync`` calls on the recording's descriptor are
logged with their file offsets and the writer's clock.  After a run, :func:`crash_image` builds
the file a power cut just before operation *k* could have left: the bytes synced before *k*
survive; of what was written after the last sync, one of

* ``drop``:  nothing survives (the page cache is gone);
* ``tear``:  the writes survive in order, the last one torn at a random byte;
* ``zero``:  the file has its full length, but from a random offset on it holds zeros
  (the size reached the disk, the data did not);
* ``pages``: each 4 KiB page of the unsynced range survives or reads as zeros, at random
  (the disk reorders), and the file may end at any page boundary.

:func:`run_trials` writes randomised recordings under a fake clock, cuts them at random points in
every mode, and checks each image with the reader: it opens (or, when nothing was synced, fails
with a traceml error), every row synced before the cut is there with its exact values, no row is
invented, and every row appended more than the documented window before the cut was synced
(docs/format.md, "Power loss").  Used by ``tests/test_format_power_loss.py`` (a short run) and
``scripts/power_loss.py`` (>= 1,000 trials).  Not a test module.
"""

from __future__ import annotations

import os
import random
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import traceml.format.writer as writer_module
from traceml.errors import TracemlError
from traceml.format import TmlWriter, open_recording
from traceml.schema import PHASES, STEP_TIME

MODES = ("drop", "tear", "zero", "pages")
PAGE = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Op:
    kind: str  # "write" | "sync"
    start: int  # file offset of a write; the synced length for a sync
    end: int
    t: float  # the writer's clock at the call
    rows_synced: int = 0  # for a sync: data rows the writer had written by then


class CrashLog:
    """The ``os`` module as the writer sees it: real calls, with writes and syncs of one file logged."""

    def __init__(self, path: Path, clock: FakeClock) -> None:
        self._path = str(path)
        self._clock = clock
        self.fd = -1
        self.pos = 0
        self.ops: list[Op] = []
        self.writer: TmlWriter | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        if os.fspath(path) == self._path:
            self.fd, self.pos = fd, 0
        return fd

    def write(self, fd: int, data: Any) -> int:
        n = os.write(fd, data)
        if fd == self.fd:
            self.ops.append(Op("write", self.pos, self.pos + n, self._clock()))
            self.pos += n
        return n

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)
        if fd == self.fd:
            rows = self.writer.rows_written if self.writer is not None else 0
            self.ops.append(Op("sync", self.pos, self.pos, self._clock(), rows))

    def ftruncate(self, fd: int, length: int) -> None:
        if fd == self.fd:
            raise AssertionError("the simulation does not expect a write failure (ftruncate)")
        os.ftruncate(fd, length)


@contextmanager
def shimmed(log: CrashLog) -> Iterator[CrashLog]:
    real = writer_module.os
    writer_module.os = log  # type: ignore[assignment]
    try:
        yield log
    finally:
        writer_module.os = real


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    """``n`` step_time rows from ``start``; every value a function of the step."""
    step = np.arange(start, start + n, dtype=np.int64)
    cols: dict[str, np.ndarray] = {"step": step, "ts_ns": 1_760_000_000_000_000_000 + step * 1_000_000}
    cols["failed"] = (step % 13 == 0).astype(np.uint8)
    for k, phase in enumerate(PHASES):
        cols[f"{phase}_us"] = (step * (k + 7)) % 1000 + k
    cols["step_us"] = sum(cols[f"{p}_us"] for p in PHASES)
    return {c.name: cols[c.name] for c in STEP_TIME.columns}


@dataclass
class Recording:
    """One simulated run: the file's final bytes, the op log and when each step was appended."""

    data: bytes
    ops: list[Op]
    appended_at: np.ndarray  # clock time of each step's append, by step
    window_s: float
    options: dict[str, Any]


def record(path: Path, rng: random.Random) -> Recording:
    """Write a recording with randomised writer options and a steady, bursty stream of rows."""
    clock = FakeClock()
    options = {
        "segment_max_bytes": rng.choice([4 << 10, 16 << 10, 64 << 10]),
        "segment_max_age_s": rng.choice([0.5, 1.0, 2.0]),
        "fsync_interval_s": rng.choice([1.0, 2.0, 5.0]),
        "checkpoint_interval_s": rng.choice([3.0, 30.0]),
        "checkpoint_every_segments": rng.choice([4, 64]),
        "rollup_steps": rng.choice([None, 16, 256]),
    }
    tick_s = rng.choice([0.2, 0.5, 1.0])
    # the documented bound: a row is synced at most this long after its append (docs/format.md)
    window = options["segment_max_age_s"] + options["fsync_interval_s"] + 2 * tick_s
    log = CrashLog(path, clock)
    times: list[float] = []
    with shimmed(log):
        w = TmlWriter(path, run_meta={"run_id": "power-loss"}, clock=clock, **options)
        log.writer = w
        step = 0
        next_tick = tick_s
        duration = rng.uniform(4.0, 16.0)
        while clock.now < duration:
            clock.now = round(clock.now + rng.choice([0.01, 0.05, 0.1, 0.3]), 6)
            if rng.random() < 0.85:  # now and then nothing is appended for a while
                n = rng.choice([1, 5, 40, 200])
                w.append(0, "step_time", rows(step, n))
                times.extend([clock.now] * n)
                step += n
            if clock.now >= next_tick:
                w.tick()
                next_tick = clock.now + tick_s
        if rng.random() < 0.5:
            w.close()
        # else: the process dies without close(); the OS still holds every write
    if not w.closed:
        os.close(log.fd)  # the process is gone; its descriptor with it
    return Recording(path.read_bytes(), log.ops, np.array(times), window, {**options, "tick_s": tick_s})


def crash_image(rec: Recording, k: int, mode: str, rng: random.Random) -> tuple[bytes, int, float]:
    """The file a power cut just before op ``k`` leaves in ``mode``; (bytes, rows synced, cut time)."""
    ops = rec.ops[:k]
    synced = 0
    rows_synced = 0
    for op in ops:
        if op.kind == "sync":
            synced, rows_synced = op.end, op.rows_synced
    written = max((op.end for op in ops if op.kind == "write"), default=0)
    cut_t = rec.ops[k].t if k < len(rec.ops) else rec.ops[-1].t
    durable = rec.data[:synced]
    unsynced = rec.data[synced:written]
    if mode == "drop" or not unsynced:
        tail = b""
    elif mode == "tear":
        last = next(op for op in reversed(ops) if op.kind == "write")
        keep_to = max(synced, last.start) + rng.randrange(0, max(1, last.end - max(synced, last.start)))
        tail = rec.data[synced:keep_to]
    elif mode == "zero":
        cut = rng.randrange(0, len(unsynced) + 1)
        tail = unsynced[:cut] + bytes(len(unsynced) - cut)
    elif mode == "pages":
        out = bytearray(unsynced)
        first_page = synced // PAGE
        for page in range(first_page, (written + PAGE - 1) // PAGE + 1):
            lo, hi = max(page * PAGE, synced) - synced, min((page + 1) * PAGE, written) - synced
            if lo < hi and rng.random() < 0.5:
                out[lo:hi] = bytes(hi - lo)
        boundaries = [b - synced for b in range((synced // PAGE + 1) * PAGE, written, PAGE)]
        end = rng.choice([len(out), *boundaries[-4:]])  # the size may lag a few pages behind
        tail = bytes(out[:end])
    else:
        raise ValueError(mode)
    return durable + tail, rows_synced, cut_t


@dataclass
class Tally:
    trials: int = 0
    opened: int = 0
    refused_empty: int = 0  # nothing synced yet: the reader said so with a traceml error
    crashes: list[str] = field(default_factory=list)  # reader raised something else, or refused synced data
    lost_synced: list[str] = field(default_factory=list)
    wrong_rows: list[str] = field(default_factory=list)
    window_misses: list[str] = field(default_factory=list)
    rows_synced: int = 0
    rows_recovered: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)

    @property
    def failures(self) -> int:
        return len(self.crashes) + len(self.lost_synced) + len(self.wrong_rows) + len(self.window_misses)


def check_image(
    image: bytes, path: Path, rec: Recording, rows_synced: int, cut_t: float, tally: Tally, what: str
) -> None:
    path.write_bytes(image)
    tally.trials += 1
    try:
        with open_recording(path) as reader:
            got = reader.read_table("step_time").get(0)
            reader.read_rollup("step_time")
            status = reader.inspect()["integrity"]["status"] if tally.trials % 4 == 0 else reader.integrity["status"]
    except TracemlError as exc:
        if rows_synced:
            tally.crashes.append(f"{what}: {rows_synced} rows synced but the reader refused: {exc}")
        else:
            tally.refused_empty += 1
        return
    except Exception:
        tally.crashes.append(f"{what}: {traceback.format_exc(limit=3)}")
        return
    tally.opened += 1
    tally.verdicts[status] += 1
    steps = np.empty(0, dtype=np.int64) if got is None else got["step"]
    n_recovered = len(steps)
    tally.rows_synced += rows_synced
    tally.rows_recovered += n_recovered
    if got is not None and n_recovered:
        expected = rows(0, int(steps.max()) + 1)
        for name, values in got.items():
            if not np.array_equal(values, expected[name][steps]):
                tally.wrong_rows.append(f"{what}: column {name} differs from what was appended")
                break
        if len(np.unique(steps)) != n_recovered or int(steps.max()) >= len(rec.appended_at):
            tally.wrong_rows.append(f"{what}: duplicated or invented steps")
    have = set(steps.tolist())
    missing = [s for s in range(rows_synced) if s not in have]
    if missing:
        tally.lost_synced.append(f"{what}: {len(missing)} of {rows_synced} synced rows lost (first {missing[0]})")
    old_enough = int(np.searchsorted(rec.appended_at, cut_t - rec.window_s, side="left"))
    if old_enough > rows_synced:
        tally.window_misses.append(
            f"{what}: rows appended more than {rec.window_s:g} s before the cut at t={cut_t:g} were not synced"
            f" ({old_enough} old enough, {rows_synced} synced; options {rec.options})"
        )


def run_trials(tmp: Path, trials: int, seed: int = 0, cuts_per_recording: int = 24) -> Tally:
    """``trials`` crash images from recordings written with randomised options; the tally of what the reader did."""
    rng = random.Random(seed)
    tally = Tally()
    n = 0
    while tally.trials < trials:
        rec = record(tmp / f"rec{n}.tml", rng)
        for _ in range(cuts_per_recording):
            if tally.trials >= trials:
                break
            k = rng.randrange(0, len(rec.ops) + 1)
            mode = MODES[tally.trials % len(MODES)]
            image, rows_synced, cut_t = crash_image(rec, k, mode, rng)
            tally.by_mode[mode] += 1
            what = f"recording {n} cut before op {k}/{len(rec.ops)} ({mode})"
            check_image(image, tmp / "image.tml", rec, rows_synced, cut_t, tally, what)
        (tmp / f"rec{n}.tml").unlink()
        n += 1
    return tally
