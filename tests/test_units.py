"""traceml.units: the one byte formatter and its three spellings (findings, terminal, inspect)."""

from __future__ import annotations

import pytest

from traceml.cli.format_cmds import _bytes as inspect_bytes
from traceml.diagnosis.memory import fmt_bytes as finding_bytes
from traceml.renderers.terminal import DASH
from traceml.renderers.terminal import fmt_bytes as terminal_bytes
from traceml.units import fmt_bytes

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (MIB - 1, "1024.0 KiB"),  # rounds up, stays in the unit it was measured in
        (3 * GIB // 2, "1.5 GiB"),
        (5 * TIB, "5.0 TiB"),
        (4096 * TIB, "4096.0 TiB"),  # no unit past TiB
        (-2 * MIB, "-2.0 MiB"),  # a change in size keeps its sign
    ],
)
def test_fmt_bytes_picks_the_unit_and_the_digits(n: int, text: str) -> None:
    assert fmt_bytes(n) == text
    assert finding_bytes(n) == text  # the findings and reports spell it this way


def test_the_terminal_spelling_has_no_space_and_a_dash_for_unknown() -> None:
    assert terminal_bytes(3 * GIB // 2) == "1.5GiB"
    assert terminal_bytes(12) == "12B"
    assert terminal_bytes(-1) == DASH


def test_the_inspect_spelling_groups_thousands_and_stops_at_gib() -> None:
    assert inspect_bytes(3 * TIB) == "3,072.0 GiB"
    assert inspect_bytes(999) == "999 B"
    assert inspect_bytes(10 * MIB) == "10.0 MiB"


def test_an_unknown_largest_unit_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="expected one of B, KiB, MiB, GiB, TiB"):
        fmt_bytes(1, largest="PiB")
