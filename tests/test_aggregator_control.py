"""The control channel (CLI -> aggregator JSON lines): encoding, bounded parsing, end of input."""

from __future__ import annotations

import io

import pytest

from traceml.aggregator.control import MAX_LINE_BYTES, exit_line, output_line, parse_line, read_control


def test_round_trip_of_both_kinds() -> None:
    assert parse_line(output_line("stderr", "héllo\nworld\n")) == {
        "kind": "output",
        "stream": "stderr",
        "text": "héllo\nworld\n",
    }
    assert parse_line(exit_line(3, "SIGINT", 1.23456)) == {
        "kind": "exit",
        "exit_code": 3,
        "signal": "SIGINT",
        "duration_s": 1.235,
    }
    assert parse_line(exit_line(None))["exit_code"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"kind": "launch"}\n',
        b'{"kind": "output", "stream": "stdin", "text": "x"}\n',
        b'{"kind": "output", "stream": "stdout", "text": 5}\n',
        b'{"kind": "exit", "exit_code": "3"}\n',
        b'{"kind": "exit", "exit_code": true}\n',
        b'{"kind": "exit", "exit_code": 0, "signal": 9}\n',
        b"\xff\xfe\n",
    ],
)
def test_bad_lines_are_skipped(raw: bytes) -> None:
    assert parse_line(raw) is None


def test_reader_delivers_output_then_exit_once() -> None:
    stream = io.BytesIO(
        output_line("stdout", "a\n")
        + b"garbage\n"
        + exit_line(0, "", 2.0)
        + output_line("stdout", "late\n")
        + exit_line(1)
    )
    outputs: list[tuple[str, str]] = []
    exits: list[object] = []
    read_control(stream, lambda s, t: outputs.append((s, t)), exits.append)
    assert outputs == [("stdout", "a\n"), ("stdout", "late\n")]
    assert exits == [{"kind": "exit", "exit_code": 0, "signal": "", "duration_s": 2.0}]


def test_end_of_input_without_exit_means_the_cli_is_gone() -> None:
    exits: list[object] = []
    read_control(io.BytesIO(output_line("stdout", "x")), lambda s, t: None, exits.append)
    assert exits == [None]


def test_an_overlong_line_is_skipped_not_buffered_whole() -> None:
    huge = b'{"kind": "output", "stream": "stdout", "text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n'
    outputs: list[tuple[str, str]] = []
    exits: list[object] = []
    read_control(io.BytesIO(huge + exit_line(0)), lambda s, t: outputs.append((s, t)), exits.append)
    assert outputs == [] and exits and exits[0] is not None
