"""Leaf: numbers with units for people to read (byte sizes in binary units).

Imports nothing of ours.  One formatter, spelled per medium by its options: the findings and
reports write ``1.5 GiB``, the terminal tables ``1.5GiB``, ``traceml inspect`` ``1,536.0 MiB``.
"""

from __future__ import annotations

#: binary units, smallest first
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(n: float, *, space: bool = True, grouped: bool = False, largest: str = "TiB") -> str:
    """*n* bytes in the largest unit under 1024 of it (at most *largest*): whole bytes, else one decimal.

    A negative *n* (a change in size) keeps its sign.  ``space`` puts a space before the unit;
    ``grouped`` separates thousands with commas (only visible when *largest* caps the unit).
    """
    if largest not in BYTE_UNITS:
        raise ValueError(f"largest={largest!r}: expected one of {', '.join(BYTE_UNITS)}")
    sign = "-" if n < 0 else ""
    value = abs(float(n))
    gap = " " if space else ""
    group = "," if grouped else ""
    for unit in BYTE_UNITS:
        if value < 1024 or unit == largest:
            digits = 0 if unit == "B" else 1
            return f"{sign}{value:{group}.{digits}f}{gap}{unit}"
        value /= 1024
    raise AssertionError("unreachable: the loop returns at `largest`")  # pragma: no cover
