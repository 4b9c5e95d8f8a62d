"""Bounded decode: a frame decodes to at most 16384 + 64 objects per KiB of its bytes
(``TRACEML_MAX_OBJECTS_PER_KIB``), so a peer holding the token cannot make the aggregator build
~30-90 bytes of Python objects per byte it sends (a 16 MiB frame of empty arrays took it from
38 MB to 1.48 GB).  Unit tests of the budget, then a hostile peer against a REAL
``python -m traceml.aggregator`` on 127.0.0.1 while a good rank streams."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest

from traceml.aggregator.control import exit_line
from traceml.config import max_objects_per_kib_from_env
from traceml.errors import ConfigError, MalformedFrameError
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, encode_frame, hello, rank_finished
from traceml.transport.framing import HEADER, FrameDecoder, decode_budget, decode_payload

TOKEN = "decode-token"
RUN_ID = "decode-run"
#: what the aggregator may grow by while three 16 MiB amplification frames arrive (one 16 MiB frame
#: buffer, the decode budget's objects, allocator slack); without the budget it grew by > 1 GB
RSS_GROWTH_BOUND = 120 << 20


def amplification(item: bytes, size: int, chunk: int = 60_000) -> bytes:
    """A well-formed batch payload of about *size* bytes: arrays of *chunk* copies of *item*."""
    total = size // len(item)
    parts = []
    while total > 0:
        n = min(chunk, total)
        parts.append(b"\xdd" + n.to_bytes(4, "big") + item * n)
        total -= n
    head = b"\x83" + b"".join(msgpack.packb(v) for v in ("kind", "batch", "seq", 1, "tables"))
    return head + b"\x81" + msgpack.packb("x") + b"\xdd" + len(parts).to_bytes(4, "big") + b"".join(parts)


@pytest.mark.parametrize("item", [b"\x90", b"\x80", b"\xa2ab", b"\xcd\x01\x02", b"\xc0"])
def test_frames_over_the_decode_budget_are_refused_naming_the_limit_and_the_setting(item: bytes) -> None:
    payload = amplification(item, 1 << 20)
    with pytest.raises(MalformedFrameError) as info:
        decode_payload(payload)
    message = str(info.value)
    assert f"more than {decode_budget(len(payload))} objects" in message
    assert "TRACEML_MAX_OBJECTS_PER_KIB (now 64)" in message
    if len(item) > 1:  # under the largest setting (one object per byte) the same frame goes through
        assert decode_payload(payload, max_objects_per_kib=1024)["kind"] == "batch"


def test_one_array_longer_than_the_budget_is_refused_at_its_header() -> None:
    payload = b"\x81\xa4kind\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)
    with pytest.raises(MalformedFrameError, match="decode budget"):
        decode_payload(payload)


def test_real_batches_and_small_frames_stay_far_below_the_budget() -> None:
    rows = (16 << 20) // (8 * len(STEP_TIME.columns)) - 100
    cols = {c.name: np.arange(rows, dtype="<i8") for c in STEP_TIME.columns}
    cols["failed"] = np.zeros(rows, "u1")
    frame = encode_frame({"kind": "batch", "seq": 1, "tables": {"step_time": encode_columns(STEP_TIME, cols)}})
    assert decode_payload(frame[4:])["tables"]["step_time"]["n"] == rows
    labels = [f"region{i % 50}" for i in range(20_000)]  # a str column: one object per value
    from traceml.schema import NUMPY_DTYPES, STEP_REGION

    region = {
        c.name: labels if c.dtype == "str" else np.arange(20_000).astype(NUMPY_DTYPES[c.dtype])
        for c in STEP_REGION.columns
    }

    frame = encode_frame({"kind": "batch", "seq": 2, "tables": {"step_region": encode_columns(STEP_REGION, region)}})
    assert decode_payload(frame[4:])["tables"]["step_region"]["n"] == 20_000
    small = {"kind": "attachment", "name": "env", "data": {f"k{i}": {"v": [i]} for i in range(800)}}
    assert decode_payload(encode_frame(small)[4:])["data"]["k7"] == {"v": [7]}


def test_the_setting_is_read_and_checked() -> None:
    assert max_objects_per_kib_from_env({}) == 64
    assert max_objects_per_kib_from_env({"TRACEML_MAX_OBJECTS_PER_KIB": "256"}) == 256
    for bad in ("0", "5000", "x"):
        with pytest.raises(ConfigError, match="TRACEML_MAX_OBJECTS_PER_KIB"):
            max_objects_per_kib_from_env({"TRACEML_MAX_OBJECTS_PER_KIB": bad})
    decoder = FrameDecoder(max_objects_per_kib=1024)
    payload = amplification(b"\xcd\x01\x02", 100_000)
    assert decoder.feed(HEADER.pack(len(payload)) + payload)[0]["kind"] == "batch"
    with pytest.raises(MalformedFrameError, match="decode budget"):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


# --- a real aggregator -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ident(rank: int) -> RankIdentity:
    return RankIdentity(rank=rank, local_rank=rank, world_size=2, local_world_size=2, host="h", pid=os.getpid())


def test_amplification_frames_from_a_token_holder_leave_the_aggregator_bounded(tmp_path: Path) -> None:
    port = _free_port()
    out = tmp_path / "run.tml"
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID]
    cmd += ["--expected-ranks", "2", "--out", str(out), "--control-stdin", "--finish-timeout", "5"]
    env = {k: v for k, v in os.environ.items() if k != "TRACEML_MAX_OBJECTS_PER_KIB"}
    stderr = open(tmp_path / "aggregator.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env={**env, "TRACEML_TOKEN": TOKEN}, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr
    )
    try:
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the aggregator did not listen"
                time.sleep(0.02)
        good = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, _ident(0)))

        def steps(lo: int, hi: int) -> dict[str, object]:
            rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(lo, hi)]
            return {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}

        good.send(batch(1, steps(0, 100)))
        good.flush(timeout_s=10)
        time.sleep(0.3)
        base = peak = ps.memory_info().rss
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, ps.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for item in (b"\x90", b"\x80", b"\x90"):
                payload = amplification(item, (16 << 20) - 4096)
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(encode_frame(hello(RUN_ID, TOKEN, _ident(1))) + HEADER.pack(len(payload)) + payload)
                    s.settimeout(30)
                    assert s.recv(1) == b"", "a frame over the decode budget cuts its connection"
                time.sleep(0.2)
        finally:
            stop.set()
            sampler.join()
        assert proc.poll() is None
        good.send(batch(2, steps(100, 200)))
        good.send(rank_finished("ok"))
        good.close(drain_timeout_s=10)
        assert proc.stdin is not None
        proc.stdin.write(exit_line(0, "", 1.0))
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    log = (tmp_path / "aggregator.stderr").read_text()
    assert peak - base < RSS_GROWTH_BOUND, f"aggregator RSS grew from {base >> 20} to {peak >> 20} MiB"
    assert "decode budget" in log and "TRACEML_MAX_OBJECTS_PER_KIB" in log
    with open_recording(out) as rec:
        assert rec.read_table("step_time")[0]["step"].tolist() == list(range(200))
